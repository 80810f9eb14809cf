"""The planner: commit event → job record + one datum message per datum.

Each pipeline has its own consumer on the commit stream that hands out one event at a time, and a
job is planned only once the pipeline's previous job has finished: jobs run, skip and commit in the
order of their input commits. A separate consumer records commits announced by external producers
(even for repos no pipeline reads) and dead-letters garbage.

Everything is idempotent: the job id is a hash of the pipeline version and the input commits, datum
messages carry Nats-Msg-Id job:datum, and the job record is created once.

Replicas share the consumers: a pipeline's consumer hands its one event in flight to one planner
at a time, whichever replica fetches it, and the event a dead planner held comes back to another
after the consumer's ack_wait. A planner that was paused past that (so that another planned the
job meanwhile) finds the job planned or created by someone else and stops; the pipeline's head
only moves forward (to a job of a later commit event), and a job that has ended is never failed
or purged again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.consumer import MAX_MESSAGE, consume, decode
from datumflow.broker.kv_changes import Changes
from datumflow.broker.messages import (
    CommitEvent,
    CommitRef,
    DatumInput,
    DatumResult,
    DatumTask,
    FileRef,
    JobPlanned,
    listed,
)
from datumflow.broker.outbox import Outbox
from datumflow.broker.records import CommitInfo, DatumIndexEntry, JobInfo, PipelineInfo
from datumflow.broker.settle import Msg, keep_alive
from datumflow.broker.streams import purge_subject
from datumflow.errors import NotFound, PermanentError
from datumflow.functions import job_order
from datumflow.functions.datum_sets import Packer
from datumflow.functions.rerun_planning import plan_rerun
from datumflow.metrics import current as current_metrics
from datumflow.pfs import manifest
from datumflow.pfs.datums import Leaf, datum_hash, job_datums
from datumflow.pfs.pipelines import Pipelines, job_key
from datumflow.pfs.repos import Repos
from datumflow.spec import input_leaves, input_name
from datumflow.storage.base import ObjectStore

log = logging.getLogger(__name__)
RELIST = 2.0
"""Seconds after which the pipelines are listed again though no change to them was seen
(datumflow.broker.kv_changes); a pipeline loop that ended on its own is started again within
half a second either way."""
HEARTBEAT = 5.0
_replace = msgspec.structs.replace


def make_job_id(info: PipelineInfo, commits: list[CommitInfo | None]) -> str:
    parts = [info.name, str(info.version)] + [c.id if c else "-" for c in commits]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


class Heartbeat:
    """Tells the server we are still on a message while planning takes long."""

    def __init__(self, msg: Msg) -> None:
        self.msg = msg
        self.last = time.monotonic()

    async def beat(self) -> None:
        if time.monotonic() - self.last > HEARTBEAT:
            self.last = time.monotonic()
            await keep_alive(self.msg)


class Planner:
    def __init__(self, *, broker: Broker, store: ObjectStore, scratch: Path) -> None:
        self.broker = broker
        self.store = store
        self.scratch = scratch
        self.repos = Repos(broker=broker, store=store)
        self.pipelines = Pipelines(broker=broker, repos=self.repos)

    async def run(self, stop: asyncio.Event) -> None:
        """Plan for every pipeline until `stop` is set, following pipelines as they come and go."""
        loops: dict[str, tuple[int, asyncio.Task[None], asyncio.Event]] = {}
        adopter = asyncio.create_task(self._adopt_loop(stop))
        changes = Changes(self.broker, bucket=subjects.PIPELINES_BUCKET, every=RELIST)
        current: dict[str, PipelineInfo | None] = {}
        try:
            await changes.start()
            while not stop.is_set():
                if changes.due():
                    changes.reading()
                    try:
                        current = {p.name: p for p in await self.pipelines.list()}
                    except Exception as exc:
                        log.warning("planner: listing pipelines failed: %s", exc)
                        changes.missed()
                        current = {name: None for name in loops}  # keep what runs
                for name in list(loops):
                    gone = name not in current
                    info = current.get(name)
                    version, task, halt = loops[name]
                    if gone or (info is not None and info.version != version) or task.done():
                        halt.set()
                        await task
                        del loops[name]
                for name, info in current.items():
                    if info is not None and name not in loops:
                        halt = asyncio.Event()
                        task = asyncio.create_task(self._pipeline_loop(name, halt))
                        loops[name] = (info.version, task, halt)
                await changes.wait(stop, 0.5)
        finally:
            for _, _task, halt in loops.values():
                halt.set()
            await asyncio.gather(*(t for _, t, _ in loops.values()), return_exceptions=True)
            await adopter
            await changes.close()

    async def _adopt_loop(self, stop: asyncio.Event) -> None:
        async def adopt(msg: Msg) -> None:
            if subjects.is_rerun(msg.subject):
                return  # a pipeline's own planner consumer plans it
            event = decode(msg.data, CommitEvent, what="commit event")
            await self.repos.adopt(event)

        await consume(
            self.broker,
            stream=subjects.COMMITS_STREAM,
            durable=subjects.COMMITS_CONSUMER,
            function="planner",
            handle=adopt,
            stop=stop,
        )

    async def _pipeline_loop(self, name: str, halt: asyncio.Event) -> None:
        async def handle(msg: Msg) -> None:
            if subjects.is_rerun(msg.subject):
                await plan_rerun(self, name, msg)
            else:
                await self.plan(name, msg)

        await consume(
            self.broker,
            stream=subjects.COMMITS_STREAM,
            durable=subjects.planner_consumer(name),
            function="planner",
            handle=handle,
            stop=halt,
        )

    async def plan(self, name: str, msg: Msg) -> None:
        event = decode(msg.data, CommitEvent, what="commit event")
        try:
            info = await self.pipelines.get(name)
        except NotFound:
            return  # deleted while the event was in flight
        commit = await self.repos.adopt(event)
        spec_leaves = input_leaves(info.spec.input)
        if not any(x.repo == event.repo and x.branch == commit.branch for x in spec_leaves):
            return  # a commit on a branch this pipeline does not read
        commits: list[CommitInfo | None] = []
        for leaf in spec_leaves:
            if leaf.repo == commit.repo and leaf.branch == commit.branch:
                commits.append(commit)
            else:
                commits.append(await self.repos.head(leaf.repo, leaf.branch))
        await self.plan_job(info, msg, make_job_id(info, commits), commits)

    async def plan_job(
        self,
        info: PipelineInfo,
        msg: Msg,
        job_id: str,
        commits: list[CommitInfo | None],
        *,
        rerun_of: str = "",
        previous: dict[str, DatumIndexEntry] | None = None,
    ) -> None:
        """Create the job (once), queue its datums, and mark it running. A rerun of a job's failed
        datums names that job and skips against its datum index (`previous`)."""
        name = info.name
        key = job_key(name, job_id)
        existing = await self.pipelines.jobs.find(key)
        if existing is not None and existing.state != "created":
            return  # planned already: this is a redelivery
        beat = Heartbeat(msg)
        ended = await job_order.wait_for_previous(
            self.pipelines, name=name, job_id=job_id, beat=beat.beat
        )
        if existing is None:
            log.info("planning job %s@%s", name, job_id)
            job = JobInfo(
                pipeline=name,
                id=job_id,
                version=info.version,
                seq=msg.metadata.sequence.stream,
                input_commits=[
                    CommitRef(repo=c.repo, commit=c.id, branch=c.branch) for c in commits if c
                ],
                created=time.time(),
                rerun_of=rerun_of,
            )
            if not await self.pipelines.jobs.create(key, job):
                # Another replica got this event too (ours was held past ack_wait).
                again = await self.pipelines.jobs.find(key)
                if again is not None and again.state != "created":
                    return
            await job_order.set_head(self.pipelines, name=name, job_id=job_id, seq=job.seq)
        planning = time.monotonic()
        try:
            total = await self._queue_datums(info, job_id, commits, beat, previous, last_job=ended)
        except PermanentError as exc:
            # Planning cannot succeed (a manifest gone from the store, a file list out of order):
            # end the job FAILURE rather than leave it "created", which would hold every later job
            # of the pipeline behind it.
            await self._fail_planning(name, job_id, f"planning the job's datums failed: {exc}")
            return
        await self.broker.publish(
            subjects.job_planned(name, job_id),
            JobPlanned(pipeline=name, job=job_id, data_total=total),
            msg_id=f"{job_id}:planned",
        )

        def started(job: JobInfo) -> JobInfo | None:
            if job.state != "created":
                return None
            return _replace(job, state="running", started=time.time(), data_total=total)

        await self.pipelines.jobs.update(key, started)
        log.info("planned job %s@%s: %d datums", name, job_id, total)
        metrics = current_metrics()
        if metrics is not None:
            metrics.planned.labels(pipeline=name).inc(total)
            seconds = time.monotonic() - planning
            if total and seconds > 0:
                metrics.planning_rate.labels(pipeline=name).set(total / seconds)

    async def _fail_planning(self, name: str, job_id: str, reason: str) -> None:
        # The datums queued before the fault go first, as for a killed job: nothing else of this
        # pipeline can be in the queue while its one job is still being planned (unless that job
        # has ended, failed by another replica, and the next is running: then leave it be).
        current = await self.pipelines.jobs.find(job_key(name, job_id))
        if current is not None and current.done:
            return
        await purge_subject(
            self.broker,
            stream=subjects.DATUMS_STREAM,
            subject=subjects.datum(name),
            what=f"removing the queued datums of {name}@{job_id}",
        )

        ended = False

        def failed(job: JobInfo) -> JobInfo | None:
            nonlocal ended
            ended = not job.done
            if job.done:
                return None
            now = time.time()
            return _replace(job, state="failure", reason=reason, started=now, finished=now)

        await self.pipelines.jobs.update(job_key(name, job_id), failed)
        log.error("job %s@%s: %s", name, job_id, reason)
        metrics = current_metrics()
        if ended and metrics is not None:
            metrics.jobs.labels(pipeline=name, state="failure").inc()

    async def _queue_datums(
        self,
        info: PipelineInfo,
        job_id: str,
        commits: list[CommitInfo | None],
        beat: Heartbeat,
        previous: dict[str, DatumIndexEntry] | None,
        *,
        last_job: JobInfo | None = None,
    ) -> int:
        spec = info.spec
        if previous is None:
            every = spec.reprocess_spec == "every_job"
            previous = (
                {}
                if every
                else await job_order.previous_datums(
                    self.pipelines, self.store, name=spec.name, ended=last_job
                )
            )
        publisher = Outbox(self.broker)
        packer = Packer.for_spec(publisher, spec)
        total = 0
        with tempfile.TemporaryDirectory(dir=self.scratch) as tmp:
            leaves = []
            for leaf, commit in zip(input_leaves(spec.input), commits, strict=True):
                local = (
                    await manifest.local_copy(self.store, commit.manifest, scratch=Path(tmp))
                    if commit
                    else None
                )
                files: Iterator[FileRef] = manifest.iter_lines(local) if local else iter(())
                leaves.append(
                    Leaf(
                        name=input_name(leaf),
                        repo=leaf.repo,
                        branch=leaf.branch,
                        commit=commit.id if commit else "",
                        files=files,
                    )
                )
            for did, inputs in job_datums(spec.input, leaves):
                total += 1
                await self._queue_one(info, job_id, did, inputs, previous, publisher, packer)
                if total % 512 == 0:
                    await beat.beat()
            await packer.finish()
            await publisher.flush()
        return total

    async def _queue_one(
        self,
        info: PipelineInfo,
        job_id: str,
        did: str,
        inputs: list[DatumInput],
        previous: dict[str, DatumIndexEntry],
        publisher: Outbox,
        packer: Packer,
    ) -> None:
        dhash = datum_hash(did, inputs, info.salt)
        before = previous.get(did)
        if before is not None and before.hash == dhash and before.state in ("success", "skipped"):
            # Unchanged since the last successful job, and done there: keep its output, run
            # nothing. A recovered or failed datum wrote no output, so it runs again.
            skipped = DatumResult(
                pipeline=info.name,
                job=job_id,
                datum=did,
                hash=dhash,
                state="skipped",
                output=before.output,
                files=_listed(inputs),
            )
            await publisher.publish(
                subjects.result(info.name, job_id), skipped, msg_id=f"{job_id}:{did}:skipped"
            )
            return
        task = DatumTask(
            pipeline=info.name,
            version=info.version,
            job=job_id,
            datum=did,
            hash=dhash,
            inputs=inputs,
        )
        payload = msgspec.json.encode(task)
        size = len(payload)
        if size > MAX_MESSAGE:
            # A worker would refuse it unread and the job would wait for it forever: fail it here.
            count = sum(len(i.files) for i in inputs)
            too_big = DatumResult(
                pipeline=info.name,
                job=job_id,
                datum=did,
                hash=dhash,
                state="failed",
                files=_listed(inputs),
                error=(
                    f"the datum holds {count} files, {size} bytes as a datum message, over the"
                    f" {MAX_MESSAGE} byte limit; use a glob that splits the input into more,"
                    " smaller datums"
                ),
                attempts=0,
            )
            await publisher.publish(
                subjects.result(info.name, job_id), too_big, msg_id=f"{job_id}:{did}:failed"
            )
            return
        await packer.add(task, payload)


def _listed(inputs: list[DatumInput]) -> list[FileRef]:
    return listed([f for i in inputs for f in i.files])
