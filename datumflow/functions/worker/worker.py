"""The worker: fetch a set of datums, and for each one download its files, run the user code, upload
/pfs/out, report.

A result event is published before its datum message is acked, so a worker that dies at any point
leaves its datums to be redelivered (after `ack_wait`) and done again; the committer keeps the first
terminal result of each datum. While the worker holds datums, fetched together as a datum set
(functions.worker.batch), one heartbeat tells the server it is still busy with all of them, well
inside `ack_wait`, so a long datum, or one waiting its turn in a set, is never taken from a live
worker.

User code is either a command (`transform.cmd`, a process per datum: functions.worker.commands)
or a Python function (`transform.function`, called in this process: functions.worker.calls).
The hot path has no round trip per datum: a set is one fetch; an in-process set is handed to the
user-code thread in one go, which reports each datum as it finishes; the results finished together
go out in one message (functions.worker.reporter), and acks do not wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import time
from pathlib import Path

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.messages import DatumResult, DatumTask
from datumflow.broker.pull import Puller
from datumflow.broker.records import PipelineInfo
from datumflow.broker.set_parts import Part, SetParts
from datumflow.broker.settle import Msg, ack, delivered, settle, waiting_after
from datumflow.broker.streams import pending
from datumflow.errors import BrokerError, NotFound, PermanentError, TemporaryError
from datumflow.functions.datum_sets import fixed_sets
from datumflow.functions.worker import inprocess, sandbox
from datumflow.functions.worker.ahead import Ahead
from datumflow.functions.worker.attempt import Retry, result_maker
from datumflow.functions.worker.batch import BatchSizer, Heartbeat
from datumflow.functions.worker.batched import Batched
from datumflow.functions.worker.calls import Functions, local_objects
from datumflow.functions.worker.commands import Commands, Ran
from datumflow.functions.worker.ended_jobs import EndedJobs, JobEnded
from datumflow.functions.worker.handback import attempt_of, hand_back, spent
from datumflow.functions.worker.overlap import adaptive_sets, overlapped, overlaps
from datumflow.functions.worker.pod_cost import DeletionCostMarker, NoPodDeletionCost
from datumflow.functions.worker.reporter import Reporter
from datumflow.functions.worker.sandbox import user_code_run_as
from datumflow.functions.worker.tasks import check_paths, datum_task
from datumflow.metrics import current as current_metrics
from datumflow.pfs.pipelines import Pipelines
from datumflow.pfs.repos import Repos
from datumflow.settings import PfsMode
from datumflow.storage.base import ObjectStore

log = logging.getLogger(__name__)

Item = tuple[Msg, DatumTask]


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
        pfs_mode: PfsMode = "auto",
        grace: float = 20.0,
        marker: DeletionCostMarker | None = None,
        user_code_user: str = "",
    ) -> None:
        self.broker = broker
        self.store = store
        self.pipeline = pipeline
        self.scratch = scratch
        self.ack_wait = ack_wait
        self.grace = grace
        self.mode = sandbox.choose_mode(pfs_mode)
        run_as = user_code_run_as(user=user_code_user, wanted=pfs_mode, mode=self.mode)
        self.ended = EndedJobs(broker, pipeline=pipeline)
        self.commands = Commands(
            broker=broker,
            store=store,
            scratch=scratch,
            mode=self.mode,
            run_as=run_as,
            ended=self.ended,
        )
        self.functions = Functions(store=store, commands=self.commands, scratch=scratch)
        self.batched = Batched(commands=self.commands, grace=grace)
        self.marker = marker or NoPodDeletionCost()
        self._busy: bool | None = None  # unknown: the first mark is always made
        self.pipelines = Pipelines(broker=broker, repos=Repos(broker=broker, store=store))
        self.heartbeat = Heartbeat(every=max(min(ack_wait / 3, 10.0), 0.2))
        self.reporter = Reporter(broker, self.heartbeat, store=store)
        self.sizer = BatchSizer(None, parallelism=1, adaptive=False)
        self._info: PipelineInfo | None = None
        self._sets = 0
        puller = Puller(
            broker, stream=subjects.DATUMS_STREAM, durable=subjects.worker_consumer(pipeline)
        )
        self.parts = SetParts(broker, beat_every=self.heartbeat.every)
        self.ahead = Ahead(
            broker=broker,
            puller=puller,
            heartbeat=self.heartbeat,
            size=self._set_size,
            parts=self.parts,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set; then finish the datum in hand within the grace period, or
        hand it back at once so another worker takes it now, and hand back the rest of its set."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        log.info("worker for %s started (pfs layout: %s)", self.pipeline, self.mode)
        self.ahead.stop = stop
        await self.ended.start()
        await self._warm_up()
        # What is alive now (the interpreter's modules, the user's function and what it loaded)
        # lives as long as the worker: left out of the collector's passes, which otherwise walk
        # it all on each full collection (profiles put several per cent of a busy worker there).
        gc.freeze()
        try:
            while not stop.is_set():
                msgs = await self.ahead.next(wait=1.0)
                if msgs:
                    await self._set(msgs, stop)
                else:
                    await self._mark(busy=False)
        finally:
            await self.ahead.hand_back()
            await self.ended.close()
            await self.reporter.close()
            await self.parts.close()
            await self.heartbeat.close()
            await self.ahead.puller.close()
            await self.functions.close()
            await self.batched.close()
            await asyncio.to_thread(self.commands.close)
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
                self.functions.resolve(info.spec.transform.function)

    def _adopt(self, info: PipelineInfo) -> None:
        spec = info.spec
        old = self._info.spec if self._info is not None else None
        if (
            old is None
            or spec.datum_set_spec != old.datum_set_spec
            or bool(spec.transform.function) != bool(old.transform.function)
            or spec.transform.datum_batching != old.transform.datum_batching
        ):
            self.sizer = BatchSizer(
                spec.datum_set_spec,
                parallelism=spec.parallelism_spec.constant or 1,
                adaptive=adaptive_sets(info),
            )
        self._info = info

    async def _spec(self, version: int) -> PipelineInfo:
        if self._info is None or self._info.version < version:
            self._adopt(await self.pipelines.get(self.pipeline))
        assert self._info is not None
        return self._info

    async def _set_size(self) -> int:
        """Messages to fetch: the datums the sizer wants, in messages of the last fetch's size;
        or one, a set of `datum_set_spec.number` datums as the planner made it."""
        if self._info is not None and fixed_sets(self._info.spec):
            return 1
        waiting = 0
        if self.sizer.needs_pending:
            try:
                waiting = await pending(
                    self.broker,
                    stream=subjects.DATUMS_STREAM,
                    durable=subjects.worker_consumer(self.pipeline),
                )
            except Exception:
                return 1
        per_message = self.parts.per_message
        return max(round(self.sizer.size(round(waiting * per_message)) / per_message), 1)

    # -- a datum set -------------------------------------------------------------------------

    async def _set(self, msgs: list[Msg], stop: asyncio.Event) -> None:
        self._sets += 1
        batch = _Set(msgs, self._sets)
        waiting = waiting_after(msgs[-1])
        self.sizer.waiting(None if waiting is None else round(waiting * self.parts.per_message))
        self.heartbeat.hold(msgs)
        await self._mark(busy=True)
        started, waited = time.monotonic(), self.functions.thread.waited()
        work = asyncio.create_task(self._work(batch, stop))
        try:
            if not stop.is_set():
                stopping = asyncio.create_task(stop.wait())
                await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
            if not work.done():
                # Stopping: finish the datum in hand (within the grace period), start no other.
                self.functions.halt()
                await asyncio.wait({work}, timeout=self.grace)
            if not work.done():
                log.info("stopping: handing back the datum in hand (%s)", msgs[0].subject)
                work.cancel()
                await asyncio.wait({work})
        finally:
            if not work.done():
                work.cancel()  # we are cancelled ourselves: so is the work
            waited = max(self.functions.thread.waited() - waited, 0.0)
            seconds = max(time.monotonic() - started - waited, 0.0)
            self.sizer.observe(datums=batch.done, seconds=seconds, input_bytes=batch.input_bytes)

    async def _mark(self, *, busy: bool) -> None:
        """Busy from the first datum, idle once a fetch finds none: a worker going from one set
        to the next stays busy, rather than mark (a file, a pod annotation) twice a set."""
        if busy == self._busy:
            return
        self._busy = busy
        metrics = current_metrics()
        if metrics is not None:
            metrics.busy.labels(pipeline=self.pipeline).set(1 if busy else 0)
        await (self.marker.busy() if busy else self.marker.idle())

    async def _work(self, batch: _Set, stop: asyncio.Event) -> None:
        try:
            items = await self._decode(batch)
            if items:
                info = await self._spec(max(task.version for _, task in items))
                items, failed = spent(items, datum_tries=info.spec.datum_tries)
                for msg, result in failed:  # its worker died during each attempt left
                    self.reporter.report(msg, result)
                    batch.settle(msg)
                if self._runs_ahead(info, items):
                    await self._function_set(batch, items, info)
                elif overlaps(info, self.commands):
                    await overlapped(items, lambda m, t: self._one(batch, m, t, info), stop)
                else:
                    for msg, task in items:
                        if stop.is_set():
                            break  # stopping: the rest of the set goes back at once
                        await self._one(batch, msg, task, info)
        except asyncio.CancelledError:
            await self._hand_back(batch)
            raise
        except Exception:
            log.exception("worker: unexpected error in a datum set; handing it back")
            await self._hand_back(batch, fault=True)
            return
        await self._hand_back(batch)

    async def _decode(self, batch: _Set) -> list[Item]:
        items: list[Item] = []
        metrics = current_metrics()
        if metrics is not None:
            again = sum(1 for msg in batch.msgs if delivered(msg) > 1)
            if again:
                metrics.redeliveries.labels(pipeline=self.pipeline).inc(again)
        for msg in batch.msgs:
            try:
                task = msg.task if isinstance(msg, Part) else datum_task(msg.data)
                check_paths(task)
            except PermanentError as exc:
                batch.settle(msg)
                self.heartbeat.release(msg)
                await settle(self.broker, function="worker", msgs=msg, outcome=exc)
                continue
            items.append((msg, task))
        return items

    async def _hand_back(self, batch: _Set, *, fault: bool = False) -> None:
        """The datums not run to an end go back: no attempt (handback), unless after a fault of
        ours, which may be the datum's and so counts, as a delivery, against datum_tries."""
        msgs = batch.unsettled()
        for msg in msgs:
            batch.settle(msg)
            self.heartbeat.release(msg)
        if fault:
            back = TemporaryError("handed back after an unexpected error", delay=2)
            await settle(self.broker, function="worker", msgs=msgs, outcome=back)
        else:
            await hand_back(self.broker, msgs)

    def _runs_ahead(self, info: PipelineInfo, items: list[Item]) -> bool:
        """Whether the user-code thread may take the whole set at once: an in-process function,
        every input in the local store, and no err_cmd (which needs the failed datum's layout
        left as it was)."""
        transform = info.spec.transform
        if not transform.function or transform.err_cmd:
            return False
        return all(local_objects(self.store, task) is not None for _, task in items)

    async def _one(self, batch: _Set, msg: Msg, task: DatumTask, info: PipelineInfo) -> None:
        """One datum, start to end, before the next one starts."""
        attempt = attempt_of(msg, task)
        # The next set is fetched once the set's last process has ended (functions.worker.ahead).
        ran = self.ahead.start if msg is batch.msgs[-1] else None
        try:
            result = await self.process(task, info, attempt, number=batch.number, ran=ran)
        except Retry as exc:
            await self._retry(batch, msg, task, attempt, str(exc))
            return
        except JobEnded as exc:
            log.info("datum %s not run: %s", task.datum[:12], exc)
            batch.settle(msg)
            self.heartbeat.release(msg)
            await ack(msg)
            return
        except BrokerError as exc:
            log.warning("datum %s: broker trouble (%s); it will come back", task.datum[:12], exc)
            batch.settle(msg)
            self.heartbeat.release(msg)
            await settle(self.broker, function="worker", msgs=msg, outcome=exc)
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
        again = TemporaryError(error, delay=min(0.5 * 2 ** (attempt - 1), 10))
        await settle(self.broker, function="worker", msgs=msg, outcome=again)

    async def _report(self, batch: _Set, msg: Msg, task: DatumTask, result: DatumResult) -> None:
        batch.done += 1
        batch.input_bytes += sum(f.size for i in task.inputs for f in i.files)
        self.reporter.report(msg, result)  # the message is the reporter's now
        batch.settle(msg)

    async def process(
        self, task: DatumTask, info: PipelineInfo, attempt: int, *, number: int = 0, ran: Ran = None
    ) -> DatumResult:
        """Download, run, upload one datum. Raises Retry when the attempt failed and tries
        remain."""
        make = result_maker(task, attempt)
        if info.spec.transform.function:
            return await self.functions.one(task, info, attempt, number, make)
        if info.spec.transform.datum_batching:
            return await self.batched.run(task, info, attempt, make)
        return await self.commands.run(task, info, attempt, make, ran=ran)

    async def _function_set(self, batch: _Set, items: list[Item], info: PipelineInfo) -> None:
        """The whole set on the user-code thread; each result is reported as it comes, while
        the thread goes on with the next datum."""
        attempts = [attempt_of(msg, task) for msg, task in items]
        tasks = [(task, attempt) for (_, task), attempt in zip(items, attempts, strict=True)]
        # Closed on the way out, whatever happens: the thread stops with the set.
        sets = self.functions.each(tasks, info, batch.number, on_last=self.ahead.start)
        async with contextlib.aclosing(sets) as results:
            async for index, outcome in results:
                msg, task = items[index]
                if isinstance(outcome, Retry):
                    await self._retry(batch, msg, task, attempts[index], str(outcome))
                else:
                    await self._report(batch, msg, task, outcome)


def default_scratch(home: Path) -> Path:
    return home / "scratch" / f"worker-{os.getpid()}"
