"""The worker: fetch a datum, download its files, run the user code, upload /pfs/out, report.

The result event is published before the datum message is acked, so a worker that dies at any
point leaves the datum to be redelivered (after `ack_wait`) and done again; the committer keeps the
first terminal result of each datum. While the user code runs, the worker tells the server it is
still busy well inside `ack_wait`, so a long datum is never taken from a live worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Protocol

from nats.aio.msg import Msg

from datumflow.broker import subjects
from datumflow.broker.connection import TRANSIENT, Broker
from datumflow.broker.messages import DatumResult, DatumStats, DatumTask, FileRef
from datumflow.broker.records import PipelineInfo
from datumflow.errors import BrokerError, PermanentError
from datumflow.functions import sandbox
from datumflow.functions.consumer import Subscription, dead_letter, decode
from datumflow.functions.outputs import collect_outputs
from datumflow.pfs import manifest
from datumflow.pfs.pipelines import Pipelines
from datumflow.pfs.repos import Repos
from datumflow.spec import parse_duration
from datumflow.storage.base import ObjectStore

log = logging.getLogger(__name__)


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
        self._info: PipelineInfo | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set; then finish the datum in hand within the grace period, or
        hand it back at once so another worker takes it now."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        sub = Subscription(
            self.broker,
            stream=subjects.DATUMS_STREAM,
            durable=subjects.worker_consumer(self.pipeline),
        )
        log.info("worker for %s started (pfs layout: %s)", self.pipeline, self.mode)
        try:
            while not stop.is_set():
                for msg in await sub.fetch(batch=1, wait=1.0):
                    await self._one(msg, stop)
        finally:
            await sub.close()

    async def _one(self, msg: Msg, stop: asyncio.Event) -> None:
        await self.marker.busy()
        work = asyncio.create_task(self.handle(msg))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                done, _ = await asyncio.wait({work}, timeout=self.grace)
                if not done:
                    log.info("stopping: handing datum back (%s)", msg.subject)
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await work
                    with contextlib.suppress(Exception):
                        await msg.nak()
                    return
            await work
        finally:
            stopping.cancel()
            await self.marker.idle()

    async def _spec(self, version: int) -> PipelineInfo:
        if self._info is None or self._info.version < version:
            self._info = await self.pipelines.get(self.pipeline)
        return self._info

    async def handle(self, msg: Msg) -> None:
        """One datum message, from fetch to ack."""
        try:
            task = decode(msg.data, DatumTask, what="datum task")
        except PermanentError as exc:
            await dead_letter(self.broker, function="worker", msg=msg, reason=str(exc))
            await msg.term()
            return
        attempt = msg.metadata.num_delivered
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        try:
            info = await self._spec(task.version)
            result = await self.process(task, info, attempt)
        except Retry as exc:
            log.info(
                "datum %s attempt %d failed (%s); handing it back", task.datum[:12], attempt, exc
            )
            await msg.nak(delay=min(0.5 * 2 ** (attempt - 1), 10))
            return
        except (*TRANSIENT, BrokerError) as exc:
            log.warning("datum %s: broker trouble (%s); it will come back", task.datum[:12], exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1)
            return
        finally:
            heartbeat.cancel()
        await self.broker.publish(
            subjects.result(task.pipeline, task.job),
            result,
            msg_id=f"{task.job}:{task.datum}:{result.state}",
        )
        with contextlib.suppress(*TRANSIENT):
            await msg.ack()

    async def _heartbeat(self, msg: Msg) -> None:
        every = max(min(self.ack_wait / 3, 10.0), 0.2)
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def process(self, task: DatumTask, info: PipelineInfo, attempt: int) -> DatumResult:
        """Download, run, upload. Raises Retry when the attempt failed and tries remain."""
        spec = info.spec
        workdir = self.scratch / f"{task.job[:12]}-{task.datum[:16]}-{attempt}"
        layout = Path("/pfs") if self.mode == "direct" else workdir / "pfs"
        stats = DatumStats()
        files = [f for i in task.inputs for f in i.files]

        def result(state: str, **fields: object) -> DatumResult:
            return DatumResult(
                pipeline=task.pipeline,
                job=task.job,
                datum=task.datum,
                hash=task.hash,
                state=state,  # type: ignore[arg-type]
                files=files,
                stats=stats,
                attempts=attempt,
                **fields,  # type: ignore[arg-type]
            )

        try:
            _reset(layout)
            t0 = time.monotonic()
            try:
                stats.download_bytes = await self._download(task, layout)
            except PermanentError as exc:
                return result("failed", error=f"downloading the datum's inputs: {exc}")
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
                        return result("recovered", error=error, logs=logs)
                if attempt < spec.datum_tries:
                    raise Retry(error)
                return result("failed", error=error, logs=logs)

            t0 = time.monotonic()
            try:
                outputs = await collect_outputs(self.store, layout / "out")
            except PermanentError as exc:
                return result("failed", error=str(exc), logs=logs)
            stats.upload_time = time.monotonic() - t0
            stats.upload_bytes = sum(f.size for f in outputs)
            output = await manifest.write(self.store, outputs)
            return result("success", output=output, logs=logs)
        finally:
            await asyncio.to_thread(_clear, layout, workdir)

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
