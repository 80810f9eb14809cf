"""Datums and their logs: `list datum`, `inspect datum`, `logs`.

`list datum -f SPEC` is a dry run: the datums a spec's input gives on the current branch heads,
computed by the planner's own enumeration (`job_datums`), so what it shows is what a job would run.
A job's datums come from three places: its input commits enumerated again (every datum, with its
files, also the ones not yet done), its results in the results stream (state, time, error, logs),
and, once it has finished, its datum index (the state that counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import msgspec
import typer
from nats.aio.msg import Msg

from datumflow.broker import subjects
from datumflow.broker.messages import DatumInput, DatumResult
from datumflow.broker.records import CommitInfo, DatumIndexEntry, JobInfo, PipelineInfo
from datumflow.cli.context import Api, emit_json, fail, run, settings_of, with_api
from datumflow.errors import DatumflowError, NotFound
from datumflow.functions import results
from datumflow.functions.planner import job_datums
from datumflow.pfs import manifest
from datumflow.pfs.datums import Leaf, check_input
from datumflow.pfs.paths import parse_job
from datumflow.spec import PipelineSpec, input_leaves, input_name, load_spec


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Add this module's commands to the app and to the groups (create, list, inspect, ...)."""
    groups["list"].command("datum")(list_datum)
    groups["inspect"].command("datum")(inspect_datum)
    app.command("logs")(logs)


# -- what a datum looks like -----------------------------------------------------------------


class DatumFile(msgspec.Struct, kw_only=True):
    """One input's part of a datum: the path its glob matched (`/dir/` for a directory)."""

    input: str
    repo: str
    path: str


class PlannedDatum(msgspec.Struct, kw_only=True):
    id: str
    files: list[DatumFile]


class JobDatum(msgspec.Struct, kw_only=True):
    id: str
    files: list[DatumFile]
    state: str
    """success, failed, recovered, skipped; starting while the job runs and the datum has no
    result yet; killed for a datum its killed job never ran."""
    time: float
    """Seconds spent downloading, processing and uploading (0 for a skipped datum)."""


def _files_of(inputs: list[DatumInput]) -> list[DatumFile]:
    return [DatumFile(input=i.name, repo=i.repo, path=i.root) for i in inputs]


def _files_text(files: list[DatumFile]) -> str:
    return ", ".join(f"{f.repo}:{f.path}" for f in files)


def _seconds(result: DatumResult | None) -> float:
    if result is None:
        return 0.0
    s = result.stats
    return round(s.download_time + s.process_time + s.upload_time, 3)


# -- list datum ------------------------------------------------------------------------------


def list_datum(
    ctx: typer.Context,
    target: str = typer.Argument(
        "", metavar="[PIPELINE@JOB]", help="A job; or give --file for a dry run."
    ),
    file: str = typer.Option(
        "", "--file", "-f", help="A pipeline spec: list the datums its input gives now."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List a job's datums, or (with -f SPEC) the datums a spec would run on the branch heads."""
    if bool(target) == bool(file):
        fail("give either PIPELINE@JOB or --file SPEC (a dry run), not both nor neither")
    settings = settings_of(ctx)
    if file:
        spec = _read_spec(file)

        async def dry(api: Api) -> list[PlannedDatum]:
            return await planned_datums(api, spec)

        datums = run(with_api(settings, dry))
        if as_json:
            emit_json(datums)
        else:
            _table(["ID", "FILES"], [(d.id, _files_text(d.files)) for d in datums])
        return
    pipeline, job = _job_address(target)

    async def body(api: Api) -> list[JobDatum]:
        view = await JobView.load(api, pipeline, job)
        return view.datums()

    datums = run(with_api(settings, body))
    if as_json:
        emit_json(datums)
    else:
        _table(
            ["ID", "FILES", "STATUS", "TIME"],
            [
                (d.id, _files_text(d.files), d.state, f"{d.time:.2f}s" if d.time else "-")
                for d in datums
            ],
        )


def _table(columns: list[str], rows: list[tuple[str, ...]]) -> None:
    """Aligned columns that are never cut: a datum id is copied from here into other commands,
    and a terminal-width table would shorten it."""
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    for row in [tuple(columns), *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        typer.echo("  ".join(cells).rstrip())


def _read_spec(file: str) -> PipelineSpec:
    try:
        text = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        fail(f"{file}: {exc.strerror}")
    try:
        spec = load_spec(text, source=file)
        check_input(spec.input)
    except DatumflowError as exc:
        fail(str(exc))
    return spec


def _job_address(text: str) -> tuple[str, str]:
    try:
        return parse_job(text)
    except DatumflowError as exc:
        fail(str(exc))


async def planned_datums(api: Api, spec: PipelineSpec) -> list[PlannedDatum]:
    """The datums of `spec`'s input on the current heads of its branches; creates nothing."""
    leaves = []
    for leaf in input_leaves(spec.input):
        try:
            await api.repos.get_repo(leaf.repo)
        except NotFound:
            raise DatumflowError(
                f"input {input_name(leaf)}: repo {leaf.repo} does not exist; create it with"
                f" `datumflow create repo {leaf.repo}`"
            ) from None
        head = await api.repos.head(leaf.repo, leaf.branch)
        leaves.append(await _leaf(api, leaf.repo, leaf.branch, input_name(leaf), head))
    return [
        PlannedDatum(id=did, files=_files_of(inputs))
        for did, inputs in job_datums(spec.input, leaves)
    ]


async def _leaf(api: Api, repo: str, branch: str, name: str, commit: CommitInfo | None) -> Leaf:
    return Leaf(
        name=name,
        repo=repo,
        branch=branch,
        commit=commit.id if commit else "",
        files=await api.repos.files(commit),
    )


# -- a job's datums --------------------------------------------------------------------------


class JobView:
    """Everything known of one job's datums, gathered once."""

    def __init__(
        self,
        *,
        job: JobInfo,
        planned: list[tuple[str, list[DatumInput]]] | None,
        first: dict[str, DatumResult],
        index: dict[str, DatumIndexEntry],
    ) -> None:
        self.job = job
        self.planned = planned
        self.first = first
        self.index = index
        self._inputs = dict(planned or [])

    @classmethod
    async def load(cls, api: Api, pipeline: str, job_id: str) -> JobView:
        job = await api.pipelines.get_job(pipeline, job_id)
        events = await results.replay(api.broker, pipeline, job_id)
        index: dict[str, DatumIndexEntry] = {}
        if job.datums:
            data = await api.store.get_bytes(job.datums)
            entries = msgspec.json.decode(data, type=list[DatumIndexEntry])
            index = {e.datum: e for e in entries}
        spec = await _spec_of(api, job)
        planned = None
        if spec is not None:
            leaves = []
            for leaf in input_leaves(spec.input):
                commit = await _input_commit(api, job, leaf.repo, leaf.branch)
                leaves.append(await _leaf(api, leaf.repo, leaf.branch, input_name(leaf), commit))
            planned = list(job_datums(spec.input, leaves))
        return cls(job=job, planned=planned, first=results.first_results(events), index=index)

    def ids(self) -> list[str]:
        """Every datum, in the order the planner queued them; any only the results know after."""
        ordered = [did for did, _ in self.planned or []]
        known = set(ordered)
        extra = sorted((set(self.first) | set(self.index)) - known)
        return ordered + extra

    def counted(self, did: str) -> DatumResult | None:
        """The datum's result that counted: for a finished job, only one in its index (a
        result that came after its job was killed was ignored)."""
        if self.job.done and self.job.datums and did not in self.index:
            return None
        return self.first.get(did)

    def state(self, did: str) -> str:
        if did in self.index:
            return self.index[did].state
        result = self.counted(did)
        if result is not None:
            return result.state
        if not self.job.done:
            return "starting"
        return "killed" if self.job.state == "killed" else "unprocessed"

    def inputs(self, did: str) -> list[DatumInput] | None:
        return self._inputs.get(did)

    def files(self, did: str) -> list[DatumFile]:
        inputs = self.inputs(did)
        if inputs is not None:
            return _files_of(inputs)
        # The pipeline's spec of that version is gone: the result still lists the files.
        result = self.first.get(did)
        return [DatumFile(input="", repo="", path=f.path) for f in (result.files if result else [])]

    def datums(self) -> list[JobDatum]:
        return [
            JobDatum(
                id=did,
                files=self.files(did),
                state=self.state(did),
                time=_seconds(self.counted(did)),
            )
            for did in self.ids()
        ]

    def find(self, prefix: str) -> str:
        """The datum id that starts with `prefix` (ids are long; reasons show 12 characters)."""
        matches = [did for did in self.ids() if did.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        where = f"{self.job.pipeline}@{self.job.id}"
        if not matches:
            raise NotFound(f"no datum {prefix} in job {where}; `datumflow list datum {where}`")
        raise DatumflowError(
            f"{prefix} is the start of {len(matches)} datums of {where}; give more"
        )


async def _spec_of(api: Api, job: JobInfo) -> PipelineSpec | None:
    """The spec of the pipeline version that ran `job`, if the pipeline record still has it."""
    info = await api.pipelines.records.find(job.pipeline)
    if info is not None and info.version == job.version:
        return info.spec
    try:
        kv = await api.broker.kv(subjects.PIPELINES_BUCKET)
        history = await kv.history(job.pipeline)
    except Exception:
        return None  # older than the bucket's history: the files come from the results
    for entry in history:
        if not entry.value:
            continue
        try:
            old = msgspec.json.decode(entry.value, type=PipelineInfo)
        except msgspec.MsgspecError:
            continue
        if old.version == job.version:
            return old.spec
    return None


async def _input_commit(api: Api, job: JobInfo, repo: str, branch: str) -> CommitInfo | None:
    for ref in job.input_commits:
        if ref.repo == repo and ref.branch in ("", branch):
            return await api.repos.commits.find(f"{ref.repo}.{ref.commit}")
    return None  # the branch had no commit when the job was planned


# -- inspect datum ---------------------------------------------------------------------------


def inspect_datum(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="PIPELINE@JOB"),
    datum: str = typer.Argument(..., metavar="ID", help="The datum id, or its first characters."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show one datum of a job: state, files, error, attempts, stats, logs and output."""
    pipeline, job = _job_address(target)

    async def body(api: Api) -> dict:
        view = await JobView.load(api, pipeline, job)
        did = view.find(datum)
        result = view.first.get(did)
        inputs = view.inputs(did) or []
        detail: dict = {
            "id": did,
            "pipeline": pipeline,
            "job": job,
            "state": view.state(did),
            "hash": result.hash if result else (view.index[did].hash if did in view.index else ""),
            "time": _seconds(view.counted(did)),
            "files": msgspec.to_builtins(view.files(did)),
            "inputs": [
                {
                    "input": i.name,
                    "repo": i.repo,
                    "branch": i.branch,
                    "commit": i.commit,
                    "path": i.root,
                    "files": [f.path for f in i.files],
                }
                for i in inputs
            ],
        }
        if result is not None:
            output = await manifest.read(api.store, result.output) if result.output else []
            detail |= {
                # A result that came after its job ended (killed) is shown, but did not count.
                "counted": view.counted(did) is not None,
                "attempts": result.attempts,
                "error": result.error,
                "stats": msgspec.to_builtins(result.stats),
                "logs": result.logs,
                "output": result.output,
                "output_files": [f.path for f in output],
            }
        return detail

    detail = run(with_api(settings_of(ctx), body))
    if as_json:
        emit_json(detail)
    else:
        import yaml

        typer.echo(yaml.safe_dump(detail, sort_keys=False).rstrip())


# -- logs ------------------------------------------------------------------------------------


def logs(
    ctx: typer.Context,
    pipeline: str = typer.Option(..., "--pipeline", "-p"),
    job: str = typer.Option(
        "", "--job", "-j", help="A job id (default: the pipeline's newest job)."
    ),
    datum: str = typer.Option("", "--datum", help="A datum id, or its first characters."),
    follow: bool = typer.Option(
        False,
        "--follow",
        "-f",
        help="Then stream output as the user code writes it: until the job ends with -j, else"
        " until interrupted (every job of the pipeline).",
    ),
) -> None:
    """Print the stdout and stderr of the user code, datum by datum."""

    async def body(api: Api) -> None:
        await api.pipelines.get(pipeline)
        live = _Live(api, pipeline, job, datum) if follow else None
        if live is not None:
            await live.start()
        try:
            head = await api.pipelines.heads.find(pipeline)
            job_id = job or (head.last_job if head else "")
            printed: set[str] = set()
            if job_id:
                printed = await _stored_logs(api, pipeline, job_id, datum, strict=not follow)
            elif live is None:
                raise DatumflowError(f"pipeline {pipeline} has run no job yet")
            if live is not None:
                await live.follow(skip=printed, stored_job=job_id)
        finally:
            if live is not None:
                await live.close()

    run(with_api(settings_of(ctx), body))


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


async def _stored_logs(api: Api, pipeline: str, job: str, datum: str, *, strict: bool) -> set[str]:
    """Print the kept logs of the job's datums (in the order they finished); their ids."""
    await api.pipelines.get_job(pipeline, job)
    done = results.first_results(await results.replay(api.broker, pipeline, job))
    chosen = [r for r in done.values() if r.datum.startswith(datum)]
    if datum and strict and not chosen:
        raise NotFound(
            f"no datum {datum} has finished in job {pipeline}@{job}; `datumflow list datum"
            f" {pipeline}@{job}` shows its datums, `logs -f` follows running ones"
        )
    for result in chosen:
        if result.logs:
            _write(await api.store.get_bytes(result.logs))
    return {r.datum for r in chosen}


class _Live:
    """Output chunks the workers publish as the user code writes them (core NATS: nothing is
    kept, so we subscribe before reading the stored logs, and drop what those already showed)."""

    def __init__(self, api: Api, pipeline: str, job: str, datum: str) -> None:
        self.api = api
        self.pipeline = pipeline
        self.job = job
        self.datum = datum
        self.chunks: asyncio.Queue[Msg] = asyncio.Queue()
        self.stop = asyncio.Event()
        self.sub = None

    async def start(self) -> None:
        subject = subjects.logs(self.pipeline, self.job or "*", "*")
        self.sub = await self.api.broker.nc.subscribe(subject, cb=self.chunks.put)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)

    async def follow(self, *, skip: set[str], stored_job: str) -> None:
        ended = asyncio.create_task(self._job_end()) if self.job else None
        try:
            while not self.stop.is_set():
                try:
                    msg = await asyncio.wait_for(self.chunks.get(), timeout=0.25)
                except TimeoutError:
                    continue
                self._show(msg, skip, stored_job)
            while not self.chunks.empty():
                self._show(self.chunks.get_nowait(), skip, stored_job)
        finally:
            if ended is not None:
                ended.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ended

    def _show(self, msg: Msg, skip: set[str], stored_job: str) -> None:
        _, _, _, job, datum = (msg.subject.split(".") + [""] * 5)[:5]
        if not datum.startswith(self.datum):
            return
        if job == stored_job and datum in skip:
            return  # its whole log was printed from the store already
        _write(msg.data)

    async def _job_end(self) -> None:
        """With -j, stop once the job has ended and its last chunks have had time to arrive."""
        while True:
            info = await self.api.pipelines.get_job(self.pipeline, self.job)
            if info.done:
                await asyncio.sleep(0.5)
                self.stop.set()
                return
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
