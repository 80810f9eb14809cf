"""The committer: datum results → job figures → output commit → commit event downstream.

The results stream is the record of truth. The first terminal result of each datum counts; any
later one (a redelivery that raced, a late worker after a max-deliveries failure) is ignored, so
figures stay exact. After a restart the committer rebuilds a job's tally by replaying that job's
subjects from the stream. Finishing is idempotent: the output commit id is derived from the job id.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import msgspec
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from datumflow.broker import subjects
from datumflow.broker.connection import TRANSIENT, Broker, broker_errors
from datumflow.broker.messages import DatumResult, DatumStats, DatumTask, FileRef, JobPlanned
from datumflow.broker.records import DatumIndexEntry, JobInfo
from datumflow.errors import BrokerError, NotFound, PermanentError
from datumflow.functions.consumer import Subscription, Unusable, consume, dead_letter, decode
from datumflow.pfs import manifest
from datumflow.pfs.pipelines import Pipelines, job_key
from datumflow.pfs.repos import Repos
from datumflow.storage.base import ObjectStore

log = logging.getLogger(__name__)
_replace = msgspec.structs.replace


class Tally:
    """What the committer knows of one job: its size once planned, and each datum's outcome."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.results: dict[str, DatumResult] = {}
        self.done = False

    def add(self, message: DatumResult | JobPlanned) -> None:
        if isinstance(message, JobPlanned):
            self.total = message.data_total
        else:
            self.results.setdefault(message.datum, message)

    @property
    def complete(self) -> bool:
        return self.total is not None and len(self.results) >= self.total

    def figures(self, job: JobInfo) -> JobInfo:
        count = {"success": 0, "skipped": 0, "failed": 0, "recovered": 0}
        stats = DatumStats()
        for r in self.results.values():
            count[r.state] += 1
            stats.download_time += r.stats.download_time
            stats.process_time += r.stats.process_time
            stats.upload_time += r.stats.upload_time
            stats.download_bytes += r.stats.download_bytes
            stats.upload_bytes += r.stats.upload_bytes
        return _replace(
            job,
            data_total=self.total if self.total is not None else job.data_total,
            data_processed=count["success"],
            data_skipped=count["skipped"],
            data_failed=count["failed"],
            data_recovered=count["recovered"],
            stats=stats,
        )


def output_commit_id(job: str) -> str:
    return hashlib.sha256(f"output:{job}".encode()).hexdigest()[:32]


class Committer:
    def __init__(self, *, broker: Broker, store: ObjectStore) -> None:
        self.broker = broker
        self.store = store
        self.repos = Repos(broker=broker, store=store)
        self.pipelines = Pipelines(broker=broker, repos=self.repos)
        self.tallies: dict[tuple[str, str], Tally] = {}

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(self._results_loop(stop), self._advisory_loop(stop))

    # -- results -----------------------------------------------------------------------------

    async def _results_loop(self, stop: asyncio.Event) -> None:
        sub = Subscription(
            self.broker, stream=subjects.RESULTS_STREAM, durable=subjects.COMMITTER_CONSUMER
        )
        try:
            while not stop.is_set():
                msgs = await sub.fetch(batch=512, wait=1.0)
                if msgs:
                    await self._batch(msgs)
        finally:
            await sub.close()

    async def _batch(self, msgs: list[Msg]) -> None:
        touched: set[tuple[str, str]] = set()
        usable: list[Msg] = []
        try:
            for msg in msgs:
                try:
                    message = _decode_result(msg)
                except Unusable as exc:
                    await dead_letter(self.broker, function="committer", msg=msg, reason=str(exc))
                    await msg.term()
                    continue
                key = (message.pipeline, message.job)
                tally = await self._tally(*key)
                tally.add(message)
                touched.add(key)
                usable.append(msg)
            for key in touched:
                await self._progress(*key)
        except (*TRANSIENT, BrokerError) as exc:
            # Nothing is acked: the batch comes back and is counted again, harmlessly.
            log.warning("committer: %s; the batch will be redelivered", exc)
            self.tallies.clear()
            for msg in usable:
                await _quiet(msg.nak(delay=1))
            return
        for msg in usable:
            await _quiet(msg.ack())

    async def _tally(self, pipeline: str, job: str) -> Tally:
        key = (pipeline, job)
        tally = self.tallies.get(key)
        if tally is None:
            tally = Tally()
            record = await self.pipelines.jobs.find(job_key(pipeline, job))
            if record is not None and record.done:
                tally.done = True
            else:
                for message in await self._replay(pipeline, job):
                    tally.add(message)
            self.tallies[key] = tally
        return tally

    async def _replay(self, pipeline: str, job: str) -> list[DatumResult | JobPlanned]:
        """Every result of the job already in the stream, for a committer that (re)starts."""
        config = ConsumerConfig(
            filter_subjects=[subjects.result(pipeline, job), subjects.job_planned(pipeline, job)],
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=60,
            mem_storage=True,
        )
        out: list[DatumResult | JobPlanned] = []
        async with broker_errors(f"replaying the results of {pipeline}@{job}"):
            info = await self.broker.js.add_consumer(subjects.RESULTS_STREAM, config)
            try:
                sub = await self.broker.js.pull_subscribe_bind(
                    consumer=info.name, stream=subjects.RESULTS_STREAM
                )
                remaining = info.num_pending
                while remaining > 0:
                    msgs = await sub.fetch(batch=min(remaining, 1024), timeout=5)
                    remaining -= len(msgs)
                    for msg in msgs:
                        try:
                            out.append(_decode_result(msg))
                        except Unusable:
                            pass  # dead-lettered when it first came through
                await sub.unsubscribe()
            finally:
                try:
                    await self.broker.js.delete_consumer(subjects.RESULTS_STREAM, info.name)
                except Exception:
                    pass
        return out

    async def _progress(self, pipeline: str, job: str) -> None:
        tally = self.tallies[(pipeline, job)]
        if tally.done:
            return
        key = job_key(pipeline, job)
        if await self.pipelines.jobs.find(key) is None:
            return  # the planner has not written the record yet; its results wait in the tally
        if tally.complete:
            await self._finish(pipeline, job, tally)
            return

        def update(record: JobInfo) -> JobInfo | None:
            if record.done:
                return None
            new = tally.figures(record)
            return None if new == record else new

        await self.pipelines.jobs.update(key, update)

    # -- finishing a job ---------------------------------------------------------------------

    async def _finish(self, pipeline: str, job: str, tally: Tally) -> None:
        key = job_key(pipeline, job)
        record = await self.pipelines.jobs.find(key)
        if record is None or record.done:
            tally.done = True
            return
        try:
            info = await self.pipelines.get(pipeline)
        except NotFound:
            tally.done = True
            return
        state, reason, output_commit = "success", "", ""
        failed = sorted(
            (r for r in tally.results.values() if r.state == "failed"), key=lambda r: r.datum
        )
        if failed:
            first = failed[0]
            more = f" (and {len(failed) - 1} more failed datums)" if len(failed) > 1 else ""
            state, reason = "failure", f"datum {first.datum[:12]} failed: {first.error}{more}"
        else:
            try:
                files = await self._merge_outputs(tally)
                commit = await self.repos.commit_files(
                    pipeline,
                    info.spec.output_branch,
                    puts=files,
                    replace=True,
                    origin="pipeline",
                    provenance=record.input_commits,
                    commit_id=output_commit_id(job),
                    job=job,
                )
                output_commit = commit.id
            except PermanentError as exc:
                state, reason = "failure", str(exc)
        index = [
            DatumIndexEntry(datum=r.datum, hash=r.hash, state=r.state, output=r.output)
            for r in sorted(tally.results.values(), key=lambda r: r.datum)
        ]
        index_key, _ = await self.store.put_bytes(msgspec.json.encode(index))

        def finish(current: JobInfo) -> JobInfo | None:
            if current.done:
                return None
            return _replace(
                tally.figures(current),
                state=state,
                reason=reason,
                output_commit=output_commit,
                finished=time.time(),
                started=current.started or current.created,
                datums=index_key,
            )

        await self.pipelines.jobs.update(key, finish)
        if state == "success":
            await self.pipelines.heads.update(
                pipeline,
                lambda h: None if h.last_success == job else _replace(h, last_success=job),
            )
        tally.done = True
        tally.results = {}  # a finished job's results are in its datum index now
        log.info("job %s@%s: %s %s", pipeline, job, state, reason)

    async def _merge_outputs(self, tally: Tally) -> list[FileRef]:
        """The union of the datums' outputs; two datums writing one path fail the job."""
        owner: dict[str, str] = {}
        merged: dict[str, FileRef] = {}
        for result in sorted(tally.results.values(), key=lambda r: r.datum):
            if result.state not in ("success", "skipped") or not result.output:
                continue
            for ref in await manifest.read(self.store, result.output):
                if ref.path in merged:
                    raise PermanentError(
                        f"duplicate path output by different datums: {ref.path} (datums"
                        f" {owner[ref.path][:12]} and {result.datum[:12]})"
                    )
                owner[ref.path] = result.datum
                merged[ref.path] = ref
        ordered = [merged[p] for p in sorted(merged)]
        for ref in ordered:
            parent = ref.path.rsplit("/", 1)[0]
            while parent:
                if parent in merged:
                    raise PermanentError(
                        f"{parent} is output both as a file (datum {owner[parent][:12]}) and as a"
                        f" directory (datum {owner[ref.path][:12]})"
                    )
                parent = parent.rsplit("/", 1)[0]
        return ordered

    # -- datums whose workers died on every attempt ------------------------------------------

    async def _advisory_loop(self, stop: asyncio.Event) -> None:
        await consume(
            self.broker,
            stream=subjects.ADVISORIES_STREAM,
            durable=subjects.ADVISORY_CONSUMER,
            function="committer",
            handle=self._max_deliveries,
            stop=stop,
        )

    async def _max_deliveries(self, msg: Msg) -> None:
        advisory = msgspec.json.decode(msg.data, type=MaxDeliveries)
        if advisory.stream != subjects.DATUMS_STREAM:
            return
        async with broker_errors("reading a datum that ran out of deliveries"):
            try:
                raw = await self.broker.js.get_msg(subjects.DATUMS_STREAM, advisory.stream_seq)
            except NotFoundError:
                return  # a late worker finished it after all
        try:
            task = decode(raw.data or b"", DatumTask, what="datum task")
        except PermanentError:
            await self._forget_datum(advisory.stream_seq)
            return
        result = DatumResult(
            pipeline=task.pipeline,
            job=task.job,
            datum=task.datum,
            hash=task.hash,
            state="failed",
            files=[f for i in task.inputs for f in i.files],
            error=(
                f"the worker died during each of its {advisory.deliveries} attempts"
                " (datum_tries): killed, out of memory, or crashed; the datum was given up"
            ),
            attempts=advisory.deliveries,
        )
        await self.broker.publish(
            subjects.result(task.pipeline, task.job),
            result,
            msg_id=f"{task.job}:{task.datum}:failed",
        )
        # The server leaves such a message in the stream, work queue or not; it is ours to remove.
        await self._forget_datum(advisory.stream_seq)

    async def _forget_datum(self, seq: int) -> None:
        async with broker_errors("removing a datum that ran out of deliveries"):
            try:
                await self.broker.js.delete_msg(subjects.DATUMS_STREAM, seq)
            except NotFoundError:
                pass


class MaxDeliveries(msgspec.Struct):
    """The part of the server's max-deliveries advisory we use."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int = 0


def _decode_result(msg: Msg) -> DatumResult | JobPlanned:
    if msg.subject.startswith("df.job."):
        return decode(msg.data, JobPlanned, what="job event")  # type: ignore[return-value]
    return decode(msg.data, DatumResult, what="datum result")  # type: ignore[return-value]


async def _quiet(call) -> None:  # type: ignore[no-untyped-def]
    try:
        await call
    except Exception:
        pass
