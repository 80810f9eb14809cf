"""The pipeline spec: Pachyderm-compatible JSON or YAML, as pure data.

`load_spec` accepts snake_case and camelCase keys, fills Pachyderm's defaults and checks every field,
raising `SpecError` with the field's path (`input.cross[1].pfs.glob: ...`). Nothing here talks to the
broker or the store: whether a repo exists is checked by whoever creates the pipeline.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import msgspec

from datumflow.errors import SpecError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)(h|m|s|ms))+$")


class _Strict(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    pass


class PipelineRef(_Strict, kw_only=True):
    name: str


class PFSInput(_Strict, kw_only=True):
    repo: str
    glob: str
    name: str = ""
    """The /pfs/<name> directory; defaults to the repo."""
    branch: str = "master"
    join_on: str = ""
    outer_join: bool = False
    group_by: str = ""
    lazy: bool = False
    empty_files: bool = False


class Input(_Strict, kw_only=True):
    """Exactly one of the fields is set; the combinators nest freely."""

    pfs: PFSInput | None = None
    cross: list[Input] | None = None
    union: list[Input] | None = None
    join: list[Input] | None = None
    group: list[Input] | None = None


class Transform(_Strict, kw_only=True):
    cmd: list[str] = []
    stdin: list[str] = []
    env: dict[str, str] = {}
    accept_return_code: list[int] = []
    err_cmd: list[str] = []
    err_stdin: list[str] = []
    image: str = ""
    function: str = ""
    """datumflow: `module:function` called in-process once per datum, instead of `cmd`."""
    datum_batching: bool = False
    """`cmd` runs once per worker and asks for each datum (datumflow.batching)."""


class ParallelismSpec(_Strict, kw_only=True):
    constant: int = 0
    coefficient: float = 0.0


class DatumSetSpec(_Strict, kw_only=True):
    number: int = 0
    size_bytes: int = 0
    per_worker: int = 0


class Resources(_Strict, kw_only=True):
    cpu: float | str | None = None
    memory: str | None = None
    gpu: dict[str, Any] | None = None
    disk: str | None = None


class ScalingSpec(_Strict, kw_only=True):
    """datumflow: overrides of the autoscaler's numbers for this pipeline (see datumflow.scaling)."""

    lag_threshold: int | None = None
    activation_lag_threshold: int | None = None
    cooldown_period: float | None = None
    polling_interval: float | None = None


class PipelineSpec(_Strict, kw_only=True):
    pipeline: PipelineRef
    input: Input
    transform: Transform
    description: str = ""
    parallelism_spec: ParallelismSpec = msgspec.field(default_factory=ParallelismSpec)
    autoscaling: bool = False
    standby: bool = False
    datum_tries: int = 3
    datum_timeout: str = ""
    job_timeout: str = ""
    output_branch: str = "master"
    reprocess_spec: Literal["until_success", "every_job"] = "until_success"
    datum_set_spec: DatumSetSpec | None = None
    resource_requests: Resources | None = None
    resource_limits: Resources | None = None
    scaling: ScalingSpec | None = None
    salt: str = ""

    @property
    def name(self) -> str:
        return self.pipeline.name

    @property
    def autoscaled(self) -> bool:
        """`standby` is the 1.x spelling of `autoscaling`."""
        return self.autoscaling or self.standby


# Keys under these fields are user data (environment variable names, resource names): never renamed.
_OPAQUE = {"env", "gpu"}


def _snake(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


def _normalise_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            _snake(k) if isinstance(k, str) else k: (
                v if isinstance(k, str) and _snake(k) in _OPAQUE else _normalise_keys(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_normalise_keys(v) for v in value]
    return value


def parse_duration(text: str, *, field: str) -> float | None:
    """`"30s"`, `"5m"`, `"1h30m"`, `"250ms"` → seconds; `""` → None."""
    if not text:
        return None
    if not DURATION_RE.match(text):
        raise SpecError(f"{field}: {text!r} is not a duration like '30s', '5m' or '1h30m'")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms)", text))


def _decode_document(data: bytes | str, *, source: str) -> Any:
    text = data.decode() if isinstance(data, bytes) else data
    try:
        return json.loads(text)
    except ValueError:
        pass
    import yaml  # only for a YAML document: PyYAML takes ~20 ms to import, JSON needs none of it

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: neither valid JSON nor valid YAML: {exc}") from None


def _field_path(exc: msgspec.ValidationError) -> str:
    # msgspec says "... - at `$.input.pfs.glob`": turn that into "input.pfs.glob: ..."
    msg = str(exc)
    m = re.search(r" - at `\$\.?(.*)`$", msg)
    if not m:
        return msg
    where = m.group(1) or "(top level)"
    what = msg[: m.start()]
    return f"{where}: {what}"


def load_spec(data: bytes | str, *, source: str = "spec") -> PipelineSpec:
    """Parse and validate one pipeline spec; raises SpecError naming the field at fault."""
    document = _decode_document(data, source=source)
    if not isinstance(document, dict):
        raise SpecError(f"{source}: a pipeline spec is a mapping, got {type(document).__name__}")
    try:
        spec = msgspec.convert(_normalise_keys(document), PipelineSpec)
    except msgspec.ValidationError as exc:
        raise SpecError(f"{source}: {_field_path(exc)}") from None
    try:
        validate(spec)
    except SpecError as exc:
        raise SpecError(f"{source}: {exc}") from None
    return spec


def input_leaves(inp: Input) -> list[PFSInput]:
    """Every pfs input under `inp`, depth first, left to right."""
    if inp.pfs is not None:
        return [inp.pfs]
    children = inp.cross or inp.union or inp.join or inp.group or []
    return [leaf for child in children for leaf in input_leaves(child)]


def input_name(pfs: PFSInput) -> str:
    return pfs.name or pfs.repo


def validate(spec: PipelineSpec) -> None:
    """Checks msgspec's types cannot express; each error names its field."""
    if not NAME_RE.match(spec.pipeline.name):
        raise SpecError(
            f"pipeline.name: {spec.pipeline.name!r} must be 1-63 characters, start with a letter or"
            " digit, and hold only letters, digits, '_' and '-'"
        )
    _validate_input(spec.input, "input")
    if not spec.transform.cmd and not spec.transform.function:
        raise SpecError("transform.cmd: required (the command to run for each datum)")
    if spec.transform.datum_batching and spec.transform.function:
        raise SpecError(
            "transform.datum_batching: for transform.cmd, whose process asks for each datum;"
            " a transform.function is called once per datum already: unset one of them"
        )
    p = spec.parallelism_spec
    if p.constant < 0:
        raise SpecError(f"parallelism_spec.constant: must be >= 0, got {p.constant}")
    if p.coefficient < 0:
        raise SpecError(f"parallelism_spec.coefficient: must be >= 0, got {p.coefficient}")
    if p.constant and p.coefficient:
        raise SpecError("parallelism_spec: set exactly one of constant and coefficient")
    if spec.datum_tries < 1:
        raise SpecError(f"datum_tries: must be >= 1 (1 means no retry), got {spec.datum_tries}")
    parse_duration(spec.datum_timeout, field="datum_timeout")
    parse_duration(spec.job_timeout, field="job_timeout")
    if not NAME_RE.match(spec.output_branch):
        raise SpecError(f"output_branch: {spec.output_branch!r} is not a valid branch name")


def _validate_input(inp: Input, where: str) -> set[str]:
    """Check `inp` and return the input names a datum of it may hold.

    Two inputs of one datum with one name would share /pfs/<name>, so names must differ across the
    children of cross, join and group; a union's children never meet in a datum and may repeat one.
    """
    kinds = [k for k in ("pfs", "cross", "union", "join", "group") if getattr(inp, k) is not None]
    if len(kinds) != 1:
        found = ", ".join(kinds) if kinds else "none"
        raise SpecError(
            f"{where}: set exactly one of pfs, cross, union, join, group (found: {found})"
        )
    kind = kinds[0]
    if kind == "pfs":
        pfs = inp.pfs
        assert pfs is not None
        if not NAME_RE.match(pfs.repo):
            raise SpecError(f"{where}.pfs.repo: {pfs.repo!r} is not a valid repo name")
        if pfs.name and not NAME_RE.match(pfs.name):
            raise SpecError(f"{where}.pfs.name: {pfs.name!r} is not a valid input name")
        if input_name(pfs) == "out":
            raise SpecError(
                f"{where}.pfs.name: the input name 'out' is reserved for /pfs/out, the output;"
                " set a different name"
            )
        return {input_name(pfs)}
    children = getattr(inp, kind)
    if not children:
        raise SpecError(f"{where}.{kind}: needs at least one input")
    names: set[str] = set()
    for i, child in enumerate(children):
        child_names = _validate_input(child, f"{where}.{kind}[{i}]")
        clash = sorted(names & child_names) if kind != "union" else []
        if clash:
            raise SpecError(
                f"{where}.{kind}[{i}]: input name {clash[0]!r} is already used in this {kind};"
                " names must be unique within cross, join and group (set pfs.name to tell them"
                " apart)"
            )
        names |= child_names
    return names


def spec_json(spec: PipelineSpec) -> bytes:
    return msgspec.json.encode(spec)
