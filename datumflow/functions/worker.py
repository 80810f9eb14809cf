"""The worker: fetch a set of datums, and for each one download its files, run the user code, upload
/pfs/out, report.

A result event is published before its datum message is acked, so a worker that dies at any point
leaves its datums to be redelivered (after `ack_wait`) and done again; the committer keeps the first
terminal result of each datum. While the worker holds datums, fetched together as a datum set
(datumflow.functions.batch), one heartbeat tells the server it is still busy with all of them, well
inside `ack_wait`, so a long datum, or one waiting its turn in a set, is never taken from a live
worker.

User code is either a command (`transform.cmd`, a process per datum, datumflow.functions.sandbox)
or a Python function (`transform.function`, called in this process, datumflow.functions.inprocess).
The hot path has no round trip per datum: a set is one fetch; an in-process set is handed to the
user-code thread in one go, which reports each datum as it finishes; results are published in a
window, and acks do not wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from nats.aio.msg import Msg

from datumflow.broker import subjects
from datumflow.broker.connection import TRANSIENT, Broker
from datumflow.broker.messages import DatumResult, DatumStats, DatumTask, FileRef, listed
from datumflow.broker.records import PipelineInfo
from datumflow.errors import BrokerError, NotFound, PermanentError
from datumflow.functions import inprocess, sandbox
from datumflow.functions.batch import BatchSizer, Heartbeat
from datumflow.functions.consumer import dead_letter, decode
from datumflow.functions.layout import Layouts
from datumflow.functions.outputs import collect_outputs
from datumflow.functions.pull import Puller
from datumflow.functions.reporter import Reporter
from datumflow.functions.userthread import DatumTimeout, Run, UserThread
from datumflow.pfs import manifest
from datumflow.pfs.paths import BadPath, check_name, clean_path
from datumflow.pfs.pipelines import Pipelines
from datumflow.pfs.repos import Repos
from datumflow.spec import parse_duration
from datumflow.storage.base import ObjectStore
from datumflow.storage.file import FileStore

log = logging.getLogger(__name__)

Item = tuple[Msg, DatumTask]
MakeResult = Callable[..., DatumResult]


class Busy(Protocol):
    """Marks the worker busy or idle where that matters (a pod's deletion cost)."""

    async def busy(self) -> None: ...

    async def idle(self) -> None: ...


class _NotInAPod:
    async def busy(self) -> None:
        return None

    async def idle(self) -> None:
        return None


class Retry(Exception):
    """This attempt failed and the datum has tries left: hand it back."""


class _Set:
    """One datum set in hand: which of its messages are still ours to hand back, and figures."""

    def __init__(self, msgs: list[Msg], number: int) -> None:
        self.msgs = msgs
        self.number = number
        self.settled: set[int] = set()
        """ids of messages acked, nak'ed, terminated, or handed to the reporter."""
        self.done = 0
        self.input_bytes = 0

    def settle(self, msg: Msg) -> None:
        self.settled.add(id(msg))

    def unsettled(self) -> list[Msg]:
        return [m for m in self.msgs if id(m) not in self.settled]


class Worker:
    def __init__(
        self,
        *,
        broker: Broker,
        store: ObjectStore,
        pipeline: str,
        scratch: Path,
        ack_wait: float,
        pfs_mode: str = "auto",
        grace: float = 20.0,
        marker: Busy | None = None,
    ) -> None:
        self.broker = broker
        self.store = store
        self.pipeline = pipeline
        self.scratch = scratch
        self.ack_wait = ack_wait
        self.grace = grace
        self.mode = sandbox.choose_mode(pfs_mode)
        self.marker = marker or _NotInAPod()
        self.pipelines = Pipelines(broker=broker, repos=Repos(broker=broker, store=store))
        self.heartbeat = Heartbeat(every=max(min(ack_wait / 3, 10.0), 0.2))
        self.reporter = Reporter(broker, self.heartbeat)
        self.sizer = BatchSizer(None, parallelism=1, adaptive=False)
        self.thread = UserThread()
        self._info: PipelineInfo | None = None
        self._functions: dict[str, inprocess.UserFunction | inprocess.FunctionError] = {}
        self._layout_dirs: Layouts | None = None
        self._run: Run | None = None
        self._sets = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set; then finish the datum in hand within the grace period, or
        hand it back at once so another worker takes it now, and hand back the rest of its set."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        sub = Puller(
            self.broker,
            stream=subjects.DATUMS_STREAM,
            durable=subjects.worker_consumer(self.pipeline),
        )
        log.info("worker for %s started (pfs layout: %s)", self.pipeline, self.mode)
        await self._warm_up()
        try:
            while not stop.is_set():
                size = await self._set_size()
                msgs = await sub.fetch(batch=size, wait=1.0)
                if msgs:
                    await self._set(msgs, stop)
        finally:
            await self.reporter.close()
            await self.heartbeat.close()
            await sub.close()
            self.thread.close()
            if self._layout_dirs is not None:
                await asyncio.to_thread(self._layout_dirs.close)
            await asyncio.to_thread(shutil.rmtree, self.scratch, True)

    async def _warm_up(self) -> None:
        """Read the spec and import an in-process function before the first datum, not during it."""
        try:
            info = await self.pipelines.get(self.pipeline)
        except (NotFound, BrokerError) as exc:
            log.info("pipeline %s not readable yet (%s)", self.pipeline, exc)
            return
        self._adopt(info)
        if info.spec.transform.function:
            with contextlib.suppress(inprocess.FunctionError):
                self._function(info.spec.transform.function)

    def _adopt(self, info: PipelineInfo) -> None:
        spec = info.spec
        old = self._info.spec if self._info is not None else None
        if (
            old is None
            or spec.datum_set_spec != old.datum_set_spec
            or bool(spec.transform.function) != bool(old.transform.function)
        ):
            self.sizer = BatchSizer(
                spec.datum_set_spec,
                parallelism=spec.parallelism_spec.constant or 1,
                adaptive=bool(spec.transform.function),
            )
        self._info = info

    async def _spec(self, version: int) -> PipelineInfo:
        if self._info is None or self._info.version < version:
            self._adopt(await self.pipelines.get(self.pipeline))
        assert self._info is not None
        return self._info

    def _layouts(self) -> Layouts:
        if self._layout_dirs is None:
            self._layout_dirs = Layouts(scratch=self.scratch, direct=self.mode == "direct")
        return self._layout_dirs

    def _function(self, ref: str) -> inprocess.UserFunction:
        found = self._functions.get(ref)
        if found is None:
            try:
                found = inprocess.resolve(ref)
            except inprocess.FunctionError as exc:
                log.error("%s", exc)
                found = exc
            self._functions[ref] = found
        if isinstance(found, inprocess.FunctionError):
            raise found
        return found

    async def _set_size(self) -> int:
        if not self.sizer.needs_pending:
            return self.sizer.size()
        try:
            info = await self.broker.js.consumer_info(
                subjects.DATUMS_STREAM, subjects.worker_consumer(self.pipeline)
            )
        except Exception:
            return 1
        return self.sizer.size(info.num_pending)

    # -- a datum set -------------------------------------------------------------------------

    async def _set(self, msgs: list[Msg], stop: asyncio.Event) -> None:
        self._sets += 1
        batch = _Set(msgs, self._sets)
        self.heartbeat.hold(msgs)
        await self.marker.busy()
        started = time.monotonic()
        work = asyncio.create_task(self._work(batch, stop))
        try:
            if not stop.is_set():
                stopping = asyncio.create_task(stop.wait())
                await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
            if not work.done():
                # Stopping: finish the datum in hand (within the grace period), start no other.
                if self._run is not None:
                    self._run.halt()
                await asyncio.wait({work}, timeout=self.grace)
            if not work.done():
                log.info("stopping: handing back the datum in hand (%s)", msgs[0].subject)
                work.cancel()
                await asyncio.wait({work})
        finally:
            if not work.done():
                work.cancel()  # we are cancelled ourselves: so is the work
            self.sizer.observe(
                datums=batch.done,
                seconds=time.monotonic() - started,
                input_bytes=batch.input_bytes,
            )
            await self.marker.idle()

    async def _work(self, batch: _Set, stop: asyncio.Event) -> None:
        try:
            items = await self._decode(batch)
            if items:
                info = await self._spec(max(task.version for _, task in items))
                if self._runs_ahead(info, items):
                    await self._function_set(batch, items, info)
                else:
                    for msg, task in items:
                        if stop.is_set():
                            break  # stopping: the rest of the set goes back at once
                        await self._one(batch, msg, task, info)
        except asyncio.CancelledError:
            await self._hand_back(batch, delay=0)
            raise
        except Exception:
            log.exception("worker: unexpected error in a datum set; handing it back")
            await self._hand_back(batch, delay=2)
            return
        await self._hand_back(batch, delay=0)

    async def _decode(self, batch: _Set) -> list[Item]:
        items = []
        for msg in batch.msgs:
            try:
                task = decode(msg.data, DatumTask, what="datum task")
                _check_paths(task)  # type: ignore[arg-type]
            except PermanentError as exc:
                batch.settle(msg)
                self.heartbeat.release(msg)
                await dead_letter(self.broker, function="worker", msg=msg, reason=str(exc))
                await msg.term()
                continue
            items.append((msg, task))  # type: ignore[arg-type]
        return items

    async def _hand_back(self, batch: _Set, *, delay: float) -> None:
        for msg in batch.unsettled():
            batch.settle(msg)
            self.heartbeat.release(msg)
            with contextlib.suppress(Exception):
                await msg.nak(delay=delay or None)

    def _runs_ahead(self, info: PipelineInfo, items: list[Item]) -> bool:
        """Whether the user-code thread may take the whole set at once: an in-process function,
        every input in the local store, and no err_cmd (which needs the failed datum's layout
        left as it was)."""
        transform = info.spec.transform
        if not transform.function or transform.err_cmd:
            return False
        return all(_local_objects(self.store, task) is not None for _, task in items)

    async def _one(self, batch: _Set, msg: Msg, task: DatumTask, info: PipelineInfo) -> None:
        """One datum, start to end, before the next one starts."""
        attempt = msg.metadata.num_delivered
        try:
            result = await self.process(task, info, attempt, number=batch.number)
        except Retry as exc:
            await self._retry(batch, msg, task, attempt, str(exc))
            return
        except (*TRANSIENT, BrokerError) as exc:
            log.warning("datum %s: broker trouble (%s); it will come back", task.datum[:12], exc)
            batch.settle(msg)
            self.heartbeat.release(msg)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1)
            return
        await self._report(batch, msg, task, result)

    async def _retry(
        self, batch: _Set, msg: Msg, task: DatumTask, attempt: int, error: str
    ) -> None:
        log.info(
            "datum %s attempt %d failed (%s); handing it back", task.datum[:12], attempt, error
        )
        batch.settle(msg)
        self.heartbeat.release(msg)
        with contextlib.suppress(Exception):
            await msg.nak(delay=min(0.5 * 2 ** (attempt - 1), 10))

    async def _report(self, batch: _Set, msg: Msg, task: DatumTask, result: DatumResult) -> None:
        batch.done += 1
        batch.input_bytes += sum(f.size for i in task.inputs for f in i.files)
        self.reporter.report(msg, result)  # the message is the reporter's now
        batch.settle(msg)

    async def process(
        self, task: DatumTask, info: PipelineInfo, attempt: int, *, number: int = 0
    ) -> DatumResult:
        """Download, run, upload one datum. Raises Retry when the attempt failed and tries
        remain."""
        make = _result_maker(task, attempt)
        if info.spec.transform.function:
            return await self._call_function(task, info, attempt, number, make)
        return await self._run_command(task, info, attempt, make)

    # -- in-process functions ----------------------------------------------------------------

    async def _function_set(self, batch: _Set, items: list[Item], info: PipelineInfo) -> None:
        """The whole set on the user-code thread; each result is published as it comes, while
        the thread goes on with the next datum."""
        spec = info.spec
        try:
            function = self._function(spec.transform.function)
        except inprocess.FunctionError as exc:
            for msg, task in items:
                make = _result_maker(task, msg.metadata.num_delivered)
                await self._report(batch, msg, task, make("failed", error=str(exc)))
            return
        store = self.store
        assert isinstance(store, FileStore)
        layouts = self._layouts()
        env = dict(spec.transform.env)
        attempts = [msg.metadata.num_delivered for msg, _ in items]
        jobs = [
            functools.partial(
                inprocess.run_datum,
                function=function,
                task=task,
                layouts=layouts,
                objects=store.path,
                attempt=attempt,
                batch=batch.number,
                env=env,
            )
            for (_, task), attempt in zip(items, attempts, strict=True)
        ]
        timeout = parse_duration(spec.datum_timeout, field="datum_timeout")
        self._run = self.thread.each(jobs, timeout=timeout)
        try:
            # Closed on the way out, whatever happens: the thread stops with the set.
            async with contextlib.aclosing(aiter(self._run)) as results:
                async for index, outcome in results:
                    msg, task = items[index]
                    make = _result_maker(task, attempts[index])
                    try:
                        result = await self._called(info, task, outcome, make, attempts[index])
                    except Retry as exc:
                        await self._retry(batch, msg, task, attempts[index], str(exc))
                        continue
                    await self._report(batch, msg, task, result)
        finally:
            self._run = None

    async def _call_function(
        self, task: DatumTask, info: PipelineInfo, attempt: int, number: int, make: MakeResult
    ) -> DatumResult:
        """One datum through an in-process function, whatever the store; the layout stays as
        the datum left it until its result is made (err_cmd runs in it)."""
        spec = info.spec
        try:
            function = self._function(spec.transform.function)
        except inprocess.FunctionError as exc:
            return make("failed", error=str(exc))
        layouts = self._layouts()
        local = _local_objects(self.store, task)
        prepared = None
        download = DatumStats()
        if local is None:
            # Remote objects: lay out on this thread's layout, download with the store's async
            # client, then call.
            t0 = time.monotonic()
            prepared = layouts.pick(self.thread.generation, input_bytes=0, local=False)
            await self.thread.run(lambda _: layouts.prepare(prepared, task, None))
            try:
                download.download_bytes = await self._download(task, prepared.root)
            except PermanentError as exc:
                return make("failed", error=f"downloading the datum's inputs: {exc}")
            download.download_time = time.monotonic() - t0
        job = functools.partial(
            inprocess.run_datum,
            function=function,
            task=task,
            layouts=layouts,
            objects=local,
            attempt=attempt,
            batch=number,
            env=dict(spec.transform.env),
            prepared=prepared,
        )
        timeout = parse_duration(spec.datum_timeout, field="datum_timeout")
        async with contextlib.aclosing(aiter(self.thread.each([job], timeout=timeout))) as results:
            async for _, outcome in results:
                if isinstance(outcome, inprocess.Called) and prepared is not None:
                    outcome.download_time = download.download_time
                    outcome.download_bytes = download.download_bytes
                return await self._called(info, task, outcome, make, attempt)
        raise Retry("stopped before the datum ran")

    async def _called(
        self, info: PipelineInfo, task: DatumTask, outcome: Any, make: MakeResult, attempt: int
    ) -> DatumResult:
        """The result of one call of an in-process function (or why it did not happen)."""
        spec = info.spec
        if isinstance(outcome, DatumTimeout):
            timeout = parse_duration(spec.datum_timeout, field="datum_timeout") or 0.0
            outcome = inprocess.Called(
                error=f"the datum ran longer than datum_timeout ({spec.datum_timeout}) and was"
                " stopped",
                elapsed=timeout,
            )
        elif isinstance(outcome, FileNotFoundError) and outcome.filename:
            return make("failed", error=f"an input is missing from the store: {outcome.filename}")
        elif isinstance(outcome, BaseException):
            # Laying out the datum failed (a full disk, say): an attempt that may pass.
            outcome = inprocess.Called(error=f"laying out the datum: {outcome}", elapsed=0.0)
        assert isinstance(outcome, inprocess.Called)
        stats = DatumStats(
            download_time=outcome.download_time,
            download_bytes=outcome.download_bytes,
            process_time=outcome.elapsed,
        )
        if outcome.error:
            logs = (await self.store.put_bytes(outcome.log))[0] if outcome.log else ""
            if spec.transform.err_cmd and outcome.root is not None:
                # The layout is as the datum left it: only one datum at a time runs with err_cmd.
                recovered = await self._run_user_code(
                    task, info, outcome.root, spec.transform.err_cmd, spec.transform.err_stdin
                )
                if recovered.returncode == 0:
                    return make("recovered", error=outcome.error, logs=logs, stats=stats)
            if attempt < spec.datum_tries:
                raise Retry(outcome.error)
            return make("failed", error=outcome.error, logs=logs, stats=stats)
        if outcome.outputs is None:
            return make("success", stats=stats)
        try:
            return await self._upload(outcome.outputs, stats, make)
        finally:
            await asyncio.to_thread(shutil.rmtree, outcome.outputs, True)

    # -- commands ----------------------------------------------------------------------------

    async def _run_command(
        self, task: DatumTask, info: PipelineInfo, attempt: int, make: MakeResult
    ) -> DatumResult:
        spec = info.spec
        stats = DatumStats()
        workdir = self.scratch / f"{task.job[:12]}-{task.datum[:16]}-{attempt}"
        layout = Path("/pfs") if self.mode == "direct" else workdir / "pfs"
        try:
            _reset(layout)
            t0 = time.monotonic()
            try:
                stats.download_bytes = await self._download(task, layout)
            except PermanentError as exc:
                return make("failed", error=f"downloading the datum's inputs: {exc}", stats=stats)
            stats.download_time = time.monotonic() - t0

            outcome = await self._run_user_code(
                task, info, layout, spec.transform.cmd, spec.transform.stdin
            )
            stats.process_time = outcome.elapsed
            logs, _ = await self.store.put_bytes(outcome.log) if outcome.log else ("", 0)
            accepted = (
                outcome.returncode == 0 or outcome.returncode in spec.transform.accept_return_code
            )
            if not accepted:
                error = _failure(outcome, spec.datum_timeout)
                if spec.transform.err_cmd:
                    recovered = await self._run_user_code(
                        task, info, layout, spec.transform.err_cmd, spec.transform.err_stdin
                    )
                    if recovered.returncode == 0:
                        return make("recovered", error=error, logs=logs, stats=stats)
                if attempt < spec.datum_tries:
                    raise Retry(error)
                return make("failed", error=error, logs=logs, stats=stats)
            return await self._upload(layout / "out", stats, make, logs=logs)
        finally:
            await asyncio.to_thread(_clear, layout, workdir)

    async def _upload(
        self, out: Path, stats: DatumStats, make: MakeResult, *, logs: str = ""
    ) -> DatumResult:
        t0 = time.monotonic()
        try:
            outputs = await collect_outputs(self.store, out)
        except PermanentError as exc:
            return make("failed", error=str(exc), logs=logs, stats=stats)
        stats.upload_time = time.monotonic() - t0
        stats.upload_bytes = sum(f.size for f in outputs)
        output = await manifest.write(self.store, outputs)
        return make("success", output=output, logs=logs, stats=stats)

    async def _download(self, task: DatumTask, layout: Path) -> int:
        total = 0
        for inp in task.inputs:
            base = layout / inp.name
            base.mkdir(parents=True, exist_ok=True)
            for ref in inp.files:
                dest = base / ref.path.lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                total += await self._fetch(ref, dest)
        (layout / "out").mkdir(parents=True, exist_ok=True)
        return total

    async def _fetch(self, ref: FileRef, dest: Path) -> int:
        if ref.source is not None:
            get_source = getattr(self.store, "get_source", None)
            if get_source is None:
                raise PermanentError(
                    f"{ref.path} lives in a bucket ({ref.source.url}), but this datumflow stores"
                    " objects on the local disk; run it with --storage s3://..."
                )
            return await get_source(ref.source, dest)
        return await self.store.get_file(ref.hash, dest)

    async def _run_user_code(
        self, task: DatumTask, info: PipelineInfo, layout: Path, cmd: list[str], stdin: list[str]
    ) -> sandbox.Outcome:
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
        text = ("\n".join(stdin) + "\n").encode() if stdin else b""
        live = subjects.logs(task.pipeline, task.job, task.datum)

        async def stream(chunk: bytes) -> None:
            # Core NATS, not JetStream: live lines for `datumflow logs -f`, lost if no one
            # listens. The whole log is kept as an object with the datum's result.
            with contextlib.suppress(Exception):
                await self.broker.nc.publish(live, chunk)

        return await sandbox.run(
            cmd,
            stdin=text,
            env=sandbox.user_environment(extra),
            layout=layout,
            mode=self.mode,
            timeout=parse_duration(spec.datum_timeout, field="datum_timeout"),
            on_output=stream,
        )


def _check_paths(task: DatumTask) -> None:
    """Refuse a datum whose input names or paths would lead out of its layout: the layout is
    made by joining them, and anyone who can publish on df.datum.* could send one."""
    for inp in task.inputs:
        check_name(inp.name, what="input")
        if inp.name == "out":
            raise BadPath("input name 'out' is reserved for the output")
        for path in (inp.root, *(f.path for f in inp.files)):
            if clean_path(path) != path.rstrip("/") and path != "/":
                raise BadPath(f"input {inp.name}: path {path!r} is not a clean absolute path")


def _result_maker(task: DatumTask, attempt: int) -> MakeResult:
    files = listed([f for i in task.inputs for f in i.files])

    def make(state: str, **fields: Any) -> DatumResult:
        return DatumResult(
            pipeline=task.pipeline,
            job=task.job,
            datum=task.datum,
            hash=task.hash,
            state=state,  # type: ignore[arg-type]
            files=files,
            attempts=attempt,
            **fields,
        )

    return make


def _local_objects(store: ObjectStore, task: DatumTask) -> Callable[[str], Path] | None:
    """Where a local store keeps an object, so the user-code thread can copy inputs itself;
    None when any input must be downloaded (another store, or a file referenced in a bucket)."""
    if not isinstance(store, FileStore):
        return None
    if any(f.source is not None for i in task.inputs for f in i.files):
        return None
    return store.path


def _failure(outcome: sandbox.Outcome, timeout: str) -> str:
    if outcome.returncode is None:
        return f"the datum ran longer than datum_timeout ({timeout}) and was killed"
    tail = outcome.log[-400:].decode(errors="replace").strip()
    return f"the user code exited with code {outcome.returncode}" + (f": {tail}" if tail else "")


def _reset(layout: Path) -> None:
    if layout.exists():
        _clear(layout, layout)
    layout.mkdir(parents=True, exist_ok=True)


def _clear(layout: Path, workdir: Path) -> None:
    if layout == Path("/pfs"):
        for child in layout.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        return
    shutil.rmtree(workdir, ignore_errors=True)


def default_scratch(home: Path) -> Path:
    return home / "scratch" / f"worker-{os.getpid()}"
