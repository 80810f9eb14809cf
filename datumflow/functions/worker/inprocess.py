"""In-process transforms: `transform.function = "module:function"`, called once per datum inside
the long-lived worker, so no process is started per datum.

The contract (docs/transform.md):

    def function(inputs: dict[str, Path], out: Path) -> None
    def function(inputs: dict[str, Path], out: Path, *, datum: Datum) -> None

`inputs` maps each input name to the datum's matched path in the /pfs layout (what `$<name>` holds
for a command); `out` is the layout's `out` directory. Returning is success; raising is a failed
attempt, retried up to `datum_tries` like a non-zero exit.

`run_datum` is one datum on the user-code thread (functions.worker.userthread): lay out the
inputs (functions.worker.layout), call, and set aside what the datum wrote, so the next datum
can start while the worker uploads it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from datumflow.broker.messages import DatumTask
from datumflow.errors import PermanentError
from datumflow.functions.worker.layout import Layout, Layouts


class Datum(msgspec.Struct, kw_only=True):
    """What a function that asks for it (a keyword-only `datum` parameter) learns of its datum."""

    pipeline: str
    job: str
    id: str
    attempt: int
    pfs: Path
    """The layout's root: `pfs / "<input name>" / "<path in the repo>"`, `pfs / "out"`."""
    env: dict[str, str]
    """The pipeline's `transform.env` (the worker's own environment is not changed)."""
    batch: int
    """Datums fetched together (one datum set) share this number within a worker."""


class UserFunction(msgspec.Struct, kw_only=True):
    ref: str
    call: Callable[..., Any]
    wants_datum: bool


class FunctionError(PermanentError):
    """`transform.function` names nothing callable: every datum of the pipeline fails with this."""


def resolve(ref: str) -> UserFunction:
    """Import `module:function` (dots after the colon walk attributes: `module:Class.method`)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise FunctionError(
            f"transform.function: {ref!r} is not 'module:function' (e.g. 'mypkg.steps:resize')"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise FunctionError(
            f"transform.function: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
            " (is it installed in the worker's environment, or on its PYTHONPATH?)"
        ) from None
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise FunctionError(f"transform.function: {module_name!r} has no {attr!r}") from None
    if not callable(target):
        raise FunctionError(f"transform.function: {ref!r} is not callable")
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = {}  # a builtin without a signature: call it with the two positionals
    wanted = params.get("datum")
    wants = wanted is not None and wanted.kind in (
        wanted.KEYWORD_ONLY,
        wanted.POSITIONAL_OR_KEYWORD,
    )
    wants = wants or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return UserFunction(ref=ref, call=target, wants_datum=wants)


def input_paths(task: DatumTask, root: Path) -> dict[str, Path]:
    """Each input's matched path under `root`, as `$<name>` gives it to a command."""
    # One parse per input rather than two joins: this runs for every datum.
    top = str(root)
    return {i.name: Path(f"{top}/{i.name}/{i.root.strip('/')}") for i in task.inputs}


class Called(msgspec.Struct, kw_only=True):
    """What one call of user code came to."""

    error: str = ""
    """Empty on success; else the exception, one line."""
    log: bytes = b""
    """The traceback of a failed call."""
    elapsed: float
    output: bool = False
    """Whether anything was written under `out`."""
    outputs: Path | None = None
    """Where the datum's output was set aside for upload (see Layouts.park)."""
    root: Path | None = None
    """The datum's layout root."""
    download_time: float = 0.0
    download_bytes: int = 0


def call(function: UserFunction, inputs: dict[str, Path], out: Path, datum: Datum) -> Called:
    """Call the user function once; any exception is a failed attempt, described."""
    started = time.monotonic()
    try:
        if function.wants_datum:
            function.call(inputs, out, datum=datum)
        else:
            function.call(inputs, out)
    except Exception as exc:
        text = traceback.format_exc()
        return Called(
            error=f"{function.ref} raised {type(exc).__name__}: {exc}".strip(),
            log=text.encode(errors="replace"),
            elapsed=time.monotonic() - started,
        )
    elapsed = time.monotonic() - started
    with os.scandir(out) as entries:
        wrote = next(entries, None) is not None
    return Called(elapsed=elapsed, output=wrote)


def run_datum(
    lane: int,
    *,
    function: UserFunction,
    task: DatumTask,
    layouts: Layouts,
    objects: Callable[[str], str | Path] | None,
    attempt: int,
    batch: int,
    env: dict[str, str],
    prepared: Layout | None = None,
) -> Called:
    """One datum on user-code thread `lane`: lay out its inputs (copied from `objects`, a local
    store's path for a content hash; or `prepared` already, downloaded by the loop), call the
    function, and set its output aside."""
    if prepared is None:
        size = sum(f.size for i in task.inputs for f in i.files)
        layout = layouts.pick(lane, input_bytes=size, local=objects is not None)
        started = time.monotonic()
        copied = layouts.prepare(layout, task, objects)
        laid = time.monotonic() - started
    else:
        layout, copied, laid = prepared, 0, 0.0
    root = layout.root
    datum = Datum(
        pipeline=task.pipeline,
        job=task.job,
        id=task.datum,
        attempt=attempt,
        pfs=root,
        env=env,
        batch=batch,
    )
    called = call(function, input_paths(task, root), layout.link, datum)
    called.root = root
    called.download_time, called.download_bytes = laid, copied
    if called.output and not called.error:
        called.outputs = layouts.park(layout)
    elif not called.error:
        # Nothing written, and no err_cmd to run in the layout: the next `prepare` need not
        # look at `out` again.
        layouts.emptied(layout)
    return called
