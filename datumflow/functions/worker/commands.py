"""A datum through a command (`transform.cmd`): its inputs downloaded into a /pfs layout, the
command run in the sandbox (functions.worker.sandbox), what it wrote under /pfs/out stored.

The worker calls `Commands.run` for each datum of a command pipeline, and `Commands.user_code` for
the err_cmd of either kind of pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import shutil
import time
from collections.abc import Callable, Container, Set
from pathlib import Path

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.messages import DatumResult, DatumStats, DatumTask, FileRef
from datumflow.broker.records import PipelineInfo
from datumflow.errors import PermanentError
from datumflow.functions.worker import sandbox
from datumflow.functions.worker.attempt import MakeResult, Retry, upload
from datumflow.functions.worker.ended_jobs import JobEnded
from datumflow.functions.worker.spawner import Spawner
from datumflow.spec import parse_duration
from datumflow.storage.base import ObjectStore, reads_in_place

Ran = Callable[[], None] | None
"""Called once a datum's user code has ended, before its output is stored."""

TURN: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar("turn", default=None)
"""Set by Commands.run once the datum's user code has its turn (functions.worker.overlap)."""


class Commands:
    def __init__(
        self,
        *,
        broker: Broker,
        store: ObjectStore,
        scratch: Path,
        mode: str,
        run_as: sandbox.RunAs | None = None,
        fast: bool = True,
        ended: Container[str] = (),
    ) -> None:
        self.broker = broker
        self.store = store
        self.scratch = scratch
        self.mode = mode
        """The sandbox's pfs mode (sandbox.choose_mode): where the layout is."""
        self.run_as = run_as
        """(uid, gid) the commands run as; None: as the worker."""
        self.ended = ended
        """Jobs ended (functions.worker.ended_jobs): a datum of one is not run."""
        self.spawner = Spawner.create(mode=mode) if fast else None
        """Starts each datum's process on subprocess's fast path (functions.worker.spawner);
        None where this machine has no `setpriv`: each is then forked with a preexec_fn."""

        self._turn = asyncio.Lock()
        """Held while a datum's user code runs: one datum's at a time."""
        self._layouts: list[Path] = []
        """Emptied layout directories, for the next datums: made once, not per datum."""
        self._made = 0
        self._environment: dict[str, str] | None = None
        """The worker's environment without its credentials (sandbox.user_environment), read
        once: it does not change while the worker runs."""

    def _new_layout(self) -> Path:
        self._made += 1
        return self.scratch / f"layout-{self._made}"

    @property
    def overlaps(self) -> bool:
        """Whether datums may be downloaded and uploaded while another's user code runs: not
        where every datum's layout is /pfs itself."""
        return self.mode != "direct"

    def close(self) -> None:
        if self.spawner is not None:
            self.spawner.close()

    async def run(
        self,
        task: DatumTask,
        info: PipelineInfo,
        attempt: int,
        make: MakeResult,
        *,
        ran: Ran = None,
    ) -> DatumResult:
        """Download, run, upload one datum; raises Retry when the attempt failed and tries
        remain. `ran` is called once the datum's user code has ended, before its upload. The
        worker's datums may download and upload side by side (functions.worker.overlap), but
        their user code runs one datum at a time: TURN's event, if any, is set once this
        datum's has its turn. Raises JobEnded, before its user code starts, for a datum whose
        job has ended (killed while the datum waited)."""
        spec = info.spec
        if task.job in self.ended:
            raise JobEnded(f"job {task.job} has ended")
        stats = DatumStats()
        workdir = self._layouts.pop() if self._layouts else self._new_layout()
        layout = Path("/pfs") if self.mode == "direct" else workdir / "pfs"
        try:
            there = _reset(layout, {inp.name for inp in task.inputs})
            t0 = time.monotonic()
            try:
                stats.download_bytes = await self.download(task, layout, there=there)
            except PermanentError as exc:
                return make("failed", error=f"downloading the datum's inputs: {exc}", stats=stats)
            stats.download_time = time.monotonic() - t0

            async with self._turn:
                if (turn := TURN.get()) is not None:
                    turn.set()
                if task.job in self.ended:
                    raise JobEnded(f"job {task.job} ended while the datum waited its turn")
                outcome = await self.user_code(
                    task, info, layout, spec.transform.cmd, spec.transform.stdin
                )
                accepted = (
                    outcome.returncode == 0
                    or outcome.returncode in spec.transform.accept_return_code
                )
                recovered = None
                if not accepted and spec.transform.err_cmd:
                    recovered = await self.user_code(
                        task, info, layout, spec.transform.err_cmd, spec.transform.err_stdin
                    )
            if ran is not None:
                ran()
            stats.process_time = outcome.elapsed
            logs, _ = await self.store.put_bytes(outcome.log) if outcome.log else ("", 0)
            if not accepted:
                error = _failure(outcome, spec.datum_timeout)
                if recovered is not None and recovered.returncode == 0:
                    return make("recovered", error=error, logs=logs, stats=stats)
                if attempt < spec.datum_tries:
                    raise Retry(error)
                return make("failed", error=error, logs=logs, stats=stats)
            return await upload(self.store, layout / "out", stats, make, logs=logs)
        finally:
            # On the loop, as `_reset` is: a datum leaves a few files, and a hop to a thread and
            # back costs more than unlinking them.
            if _clear(layout, workdir):
                self._layouts.append(workdir)

    def _user_environment(self, extra: dict[str, str]) -> dict[str, str]:
        if self._environment is None:
            self._environment = sandbox.user_environment({})
        return {**self._environment, **extra}

    async def download(
        self, task: DatumTask, layout: Path, *, there: Set[str] = frozenset()
    ) -> int:
        """Every input file of the datum under `layout`, and an empty `out`; the bytes read.
        `there`: the layout's top directories known to exist already (kept from the last datum)."""
        total = 0
        top = str(layout)
        made = {f"{top}/{name}" for name in there}
        for inp in task.inputs:
            base = f"{top}/{inp.name}"
            for ref in inp.files:
                # Strings, and a directory made once: this runs for every file of every datum.
                dest = f"{base}/{ref.path.lstrip('/')}"
                parent = os.path.dirname(dest)
                if parent not in made:
                    os.makedirs(parent, exist_ok=True)
                    made.add(parent)
                total += await self._fetch(ref, Path(dest))
            if base not in made:
                os.makedirs(base, exist_ok=True)  # an input with no file matched
                made.add(base)
        if f"{top}/out" not in made:
            os.makedirs(f"{top}/out", exist_ok=True)
        return total

    async def _fetch(self, ref: FileRef, dest: Path) -> int:
        if ref.source is not None:
            if not reads_in_place(self.store):
                raise PermanentError(
                    f"{ref.path} lives in a bucket ({ref.source.url}), but this datumflow stores"
                    " objects on the local disk; run it with --storage s3://..."
                )
            return await self.store.get_source(ref.source, dest)
        return await self.store.get_file(ref.hash, dest)

    async def user_code(
        self, task: DatumTask, info: PipelineInfo, layout: Path, cmd: list[str], stdin: list[str]
    ) -> sandbox.Outcome:
        """`cmd` in the sandbox on the datum's layout, its output streamed live as it comes."""
        spec = info.spec
        root = "/pfs" if self.mode in ("namespace", "direct") else str(layout)
        extra = dict(spec.transform.env)
        for inp in task.inputs:
            extra[inp.name] = f"{root}/{inp.name}{inp.root.rstrip('/') or ''}"
        extra.update(
            PFS=root,
            PACH_JOB_ID=task.job,
            PACH_DATUM_ID=task.datum,
            PACH_PIPELINE_NAME=task.pipeline,
            PACH_OUTPUT_DIR=f"{root}/out",
        )
        if self.run_as is not None:
            # The datum's inputs are readable by anyone; its output directory is the user's.
            os.chown(layout / "out", *self.run_as)
        text = ("\n".join(stdin) + "\n").encode() if stdin else b""
        live = subjects.logs(task.pipeline, task.job, task.datum)

        async def stream(chunk: bytes) -> None:
            # Core NATS, not JetStream: live lines for `datumflow logs -f`, lost if no one
            # listens. The whole log is kept as an object with the datum's result.
            with contextlib.suppress(Exception):  # a line too big for the broker, too
                await self.broker.publish_core(live, chunk)

        return await sandbox.run(
            cmd,
            stdin=text,
            env=self._user_environment(extra),
            layout=layout,
            mode=self.mode,
            timeout=parse_duration(spec.datum_timeout, field="datum_timeout"),
            on_output=stream,
            run_as=self.run_as,
            spawner=self.spawner,
        )


def _failure(outcome: sandbox.Outcome, timeout: str) -> str:
    if outcome.returncode is None:
        return f"the datum ran longer than datum_timeout ({timeout}) and was killed"
    tail = outcome.log[-400:].decode(errors="replace").strip()
    return f"the user code exited with code {outcome.returncode}" + (f": {tail}" if tail else "")


def _reset(layout: Path, names: set[str]) -> set[str]:
    """The layout ready for a datum with inputs `names`: it exists, and holds nothing else than
    their directories and `out` (emptied by `_clear`, kept from the last datum). Returns the
    top directories it kept."""
    if layout == Path("/pfs"):
        _clear(layout, layout)
    layout.mkdir(parents=True, exist_ok=True)
    kept = set()
    with os.scandir(layout) as entries:
        for entry in entries:
            if entry.name not in names and entry.name != "out":
                _remove(entry)
            elif entry.is_dir(follow_symlinks=False):
                kept.add(entry.name)
            else:
                _remove(entry)  # not a directory where one is to be: made anew
    return kept


def _clear(layout: Path, workdir: Path) -> bool:
    """Empty what the datum left in the layout, keeping its top directories (the inputs' and
    `out`) for the next datum. False (the layout removed, not to be used again) when something
    in it could not be removed: the next datum must find nothing of this one's."""
    try:
        with os.scandir(layout) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    with os.scandir(entry.path) as inner:
                        for item in inner:
                            _remove(item)
                else:
                    os.unlink(entry.path)
        return True
    except OSError:
        if layout != Path("/pfs"):
            shutil.rmtree(workdir, ignore_errors=True)
        return False


def _remove(entry: os.DirEntry[str]) -> None:
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path)
    else:
        os.unlink(entry.path)
