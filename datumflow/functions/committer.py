"""The committer: datum results → job figures → output commit → commit event downstream.

Owns the loop over the results stream, the writing of running jobs' figures, and the end of a job:
finished (its datums' outputs merged into the output commit) or killed, one at a time per job.

The results stream is the record of truth: each job's results are counted in its `Tally`, and after
a restart the committer rebuilds a job's tally by replaying that job's subjects from the stream.
Finishing is idempotent: the output commit id is derived from the job id.

Replicas run active/standby: the committer runs only while its replica holds the committer lease
(datumflow.broker.lease, datumflow.runtime.leader), starts with a fresh state each time it takes it
(the running jobs' tallies rebuilt from the stream, and finished if complete), checks the lease
before it acks or writes, and stamps each job record it writes with the lease's fence: a replica
that lost the lease (a pause, a partition) finds a higher fence there and stops, so two tallies
never write one job.

Two more ways a job ends run beside the loop: a datum whose worker died on every attempt becomes a
FAILED result when the server gives up on it (`max_deliveries`), and a job that runs longer than
its pipeline's `job_timeout` is KILLED (`job_timeouts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time

import msgspec

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.consumer import Unusable
from datumflow.broker.lease import Lease
from datumflow.broker.pull import Puller
from datumflow.broker.records import JobInfo, JobState, PipelineInfo
from datumflow.broker.settle import Msg, settle
from datumflow.broker.streams import last_sequence, purge_subject
from datumflow.errors import BrokerError, NotFound, PermanentError, Superseded, TemporaryError
from datumflow.functions.job_metrics import job_ended, job_progress, stood_down
from datumflow.functions.job_timeouts import JobTimeouts
from datumflow.functions.lag_metrics import watch_backlogs
from datumflow.functions.max_deliveries import watch_max_deliveries
from datumflow.functions.merge_outputs import merge_outputs
from datumflow.functions.tally import Tally, failure_reason
from datumflow.pfs import results
from datumflow.pfs.pipelines import Pipelines, job_key
from datumflow.pfs.repos import Repos
from datumflow.storage.base import ObjectStore

log = logging.getLogger(__name__)
_replace = msgspec.structs.replace

LINGER = 0.05
"""Seconds the committer waits, once a result has come, for more to take with it: results that
trickle in one by one would otherwise cost a round of pull requests each."""
PROGRESS_EVERY = 0.5
"""Seconds between two writes of a running job's figures. Writing them for every batch of results
costs the committer and the broker three round trips a batch, which is most of their work when
results come one by one; a finished job is written at once."""


def output_commit_id(job: str) -> str:
    return hashlib.sha256(f"output:{job}".encode()).hexdigest()[:32]


class Committer:
    def __init__(self, *, broker: Broker, store: ObjectStore, lease: Lease | None = None) -> None:
        self.broker = broker
        self.store = store
        self.lease = lease
        """None: the only committer (tests, one replica); else write only while it is held."""
        self._stop = asyncio.Event()
        self.repos = Repos(broker=broker, store=store)
        self.pipelines = Pipelines(broker=broker, repos=self.repos)
        self.tallies: dict[tuple[str, str], Tally] = {}
        # Finishing a job and killing it both end it; one at a time per job, so that the loser
        # sees the winner's work (no output commit for a killed job, no kill of a finished one).
        self._ending: dict[tuple[str, str], asyncio.Lock] = {}
        self._unreported: set[tuple[str, str]] = set()
        """Jobs with results whose figures are not written yet."""

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        timeouts = JobTimeouts(committer=self)
        try:
            try:
                await self._resume()
            except TemporaryError as exc:  # the broker, or the store writing an output commit
                log.warning(
                    "committer: resuming the running jobs: %s; their next results will", exc
                )
            except Superseded:
                return
            await asyncio.gather(
                self._results_loop(stop),
                watch_max_deliveries(broker=self.broker, stop=stop),
                timeouts.run(stop),
                self._report_loop(stop),
                watch_backlogs(broker=self.broker, pipelines=self.pipelines, stop=stop),
            )
        finally:
            stood_down()

    @property
    def fence(self) -> int:
        return self.lease.fence if self.lease is not None else 0

    def _guard(self) -> None:
        """Raise Superseded (and stop) unless this replica may still write."""
        if self.lease is not None and not self.lease.held():
            self._stop.set()
            raise Superseded("the committer lease is no longer ours; standing by")

    def _fenced(self, record: JobInfo) -> None:
        """Raise Superseded (and stop) if a committer with a newer lease wrote `record`."""
        if record.fence > self.fence:
            self._stop.set()
            raise Superseded(
                f"job {record.pipeline}@{record.id} was written by a newer committer"
                f" (fence {record.fence} > ours {self.fence}); standing by"
            )

    async def _resume(self) -> None:
        """Each pipeline's running job: its tally rebuilt from the stream, finished if complete.

        A replica that takes over finds what the last one left: results it had counted and
        not acked yet (they come back after the consumer's ack_wait) and jobs whose last result
        came in just before it died."""
        for head in await self.pipelines.heads.all():
            if not head.last_job:
                continue
            record = await self.pipelines.jobs.find(job_key(head.pipeline, head.last_job))
            if record is None or record.done or record.state == "created":
                continue
            await self._tally(head.pipeline, head.last_job)
            await self._progress(head.pipeline, head.last_job)

    def _lock(self, pipeline: str, job: str) -> asyncio.Lock:
        return self._ending.setdefault((pipeline, job), asyncio.Lock())

    # -- results -----------------------------------------------------------------------------

    async def _results_loop(self, stop: asyncio.Event) -> None:
        sub = Puller(
            self.broker, stream=subjects.RESULTS_STREAM, durable=subjects.COMMITTER_CONSUMER
        )
        try:
            while not stop.is_set():
                msgs = await sub.fetch(batch=512, wait=1.0, linger=LINGER)
                if msgs:
                    try:
                        await self._batch(msgs)
                    except Superseded as exc:
                        # Not acked: they come back to the active replica, which has them
                        # already from the stream.
                        log.warning("committer: %s", exc)
                        return
        finally:
            await sub.close()

    async def _batch(self, msgs: list[Msg]) -> None:
        touched: set[tuple[str, str]] = set()
        usable: list[Msg] = []
        try:
            for msg in msgs:
                try:
                    events = results.decode_events(msg)
                except Unusable as exc:
                    await settle(self.broker, function="committer", msgs=msg, outcome=exc)
                    continue
                for event in events:
                    key = (event.pipeline, event.job)
                    tally = await self._tally(*key)
                    tally.add(event)
                    touched.add(key)
                usable.append(msg)
            self._guard()
            for key in touched:
                if self.tallies[key].complete:
                    await self._progress(*key)
                else:
                    self._unreported.add(key)
        except TemporaryError as exc:
            # The broker or the object store (writing an output commit) failed for now. Nothing
            # is acked: the batch comes back and is counted again, harmlessly.
            log.warning("committer: %s; the batch will be redelivered", exc)
            self.tallies.clear()
            await settle(self.broker, function="committer", msgs=usable, outcome=exc)
            return
        self._guard()
        await settle(self.broker, function="committer", msgs=usable)

    async def _tally(self, pipeline: str, job: str) -> Tally:
        key = (pipeline, job)
        tally = self.tallies.get(key)
        if tally is None:
            tally = Tally()
            record = await self.pipelines.jobs.find(job_key(pipeline, job))
            if record is not None and record.done:
                tally.done = True
            else:
                for message in await results.replay(self.broker, pipeline, job):
                    tally.add(message)
            self.tallies[key] = tally
        return tally

    async def _report_loop(self, stop: asyncio.Event) -> None:
        """Every PROGRESS_EVERY seconds, the figures of the jobs that had results since."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=PROGRESS_EVERY)
            for key in list(self._unreported):
                self._unreported.discard(key)
                try:
                    await self._progress(*key)
                except BrokerError as exc:
                    log.warning("committer: reporting %s@%s: %s", *key, exc)
                    self._unreported.add(key)
                except Superseded as exc:
                    log.warning("committer: %s", exc)
                    return
                except Exception:
                    log.exception("committer: reporting %s@%s", *key)

    async def _progress(self, pipeline: str, job: str) -> None:
        tally = self.tallies.get((pipeline, job))
        if tally is None or tally.done:
            return  # forgotten after a broker error: its results come back and report it
        key = job_key(pipeline, job)
        if tally.complete:
            if await self.pipelines.jobs.find(key) is None:
                return  # the planner has not written the record yet; its results wait in the tally
            await self._finish(pipeline, job, tally)
            return

        def update(record: JobInfo) -> JobInfo | None:
            self._fenced(record)
            if record.done:
                return None
            new = _replace(tally.figures(record), fence=self.fence)
            return None if new == record else new

        self._guard()
        try:
            # Reads the record itself: no read before it (twice a second, the committer's most
            # frequent request to the broker while a job runs).
            await self.pipelines.jobs.update(key, update)
        except NotFound:
            return  # the planner has not written the record yet; its results wait in the tally
        job_progress(pipeline=pipeline, tally=tally)

    # -- ending a job ------------------------------------------------------------------------

    async def _finish(self, pipeline: str, job: str, tally: Tally) -> None:
        async with self._lock(pipeline, job):
            if tally.done:
                return  # killed while we waited for the lock
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
            self._fenced(record)
            self._guard()
            state, reason, output_commit = await self._outcome(info, record, tally)
            won = await self._end(key, tally, state=state, reason=reason, output=output_commit)
            if won and state == "success":
                await self.pipelines.heads.update(
                    pipeline,
                    lambda h: None if h.last_success == job else _replace(h, last_success=job),
                )
            tally.done = True
            tally.results = {}  # a finished job's results are in its datum index now
            log.info("job %s@%s: %s %s", pipeline, job, state, reason)
        self._ending.pop((pipeline, job), None)  # an ended job's tally says so from now on

    async def _outcome(
        self, info: PipelineInfo, record: JobInfo, tally: Tally
    ) -> tuple[JobState, str, str]:
        """(state, reason, output commit) of a job all of whose datums have a result."""
        failed = sorted(
            (r for r in tally.results.values() if r.state == "failed"), key=lambda r: r.datum
        )
        if failed:
            return "failure", failure_reason(failed), ""
        try:
            files = await merge_outputs(store=self.store, tally=tally)
            commit = await self.repos.commit_files(
                info.name,
                info.spec.output_branch,
                puts=files,
                replace=True,
                origin="pipeline",
                provenance=record.input_commits,
                commit_id=output_commit_id(record.id),
                job=record.id,
            )
        except PermanentError as exc:
            return "failure", str(exc), ""
        return "success", "", commit.id

    async def _end(
        self, key: str, tally: Tally, *, state: JobState, reason: str, output: str = ""
    ) -> bool:
        """Write the job's final record with its datum index; False if it had already ended."""
        index_key, _ = await self.store.put_bytes(msgspec.json.encode(tally.index()))
        won = False
        written: JobInfo | None = None

        def end(current: JobInfo) -> JobInfo | None:
            nonlocal won, written
            self._fenced(current)
            won = not current.done
            if not won:
                return None
            written = _replace(
                tally.figures(current),
                state=state,
                reason=reason,
                output_commit=output,
                finished=time.time(),
                started=current.started or current.created,
                datums=index_key,
                fence=self.fence,
            )
            return written

        self._guard()
        await self.pipelines.jobs.update(key, end)
        if won and written is not None:
            job_ended(pipeline=written.pipeline, tally=tally, state=state, record=written)
        return won

    async def kill(self, pipeline: str, job: str, *, why: str) -> bool:
        """End a running job KILLED: its queued datums are removed, later results ignored.

        True if this call killed it; False if it had ended already."""
        async with self._lock(pipeline, job):
            tally = await self._tally(pipeline, job)
            if tally.done:
                return False
            self._guard()
            done = sum(1 for r in tally.results.values() if r.state in ("success", "skipped"))
            total = "?" if tally.total is None else tally.total
            reason = f"{why}; {done} of {total} datums were done"
            # Purge before the record says killed: the planner plans the pipeline's next job only
            # once this one has ended, and that job's datums must not go with these. So only
            # what was queued before the record was seen running and ours goes: a committer that
            # lost the lease while paused here removes no datum of a job planned since.
            what = f"removing the queued datums of {pipeline}@{job}"
            end = await last_sequence(self.broker, stream=subjects.DATUMS_STREAM, what=what)
            record = await self.pipelines.jobs.find(job_key(pipeline, job))
            if record is not None:
                self._fenced(record)
            if record is None or not record.done:
                subject = subjects.datum(pipeline)
                await purge_subject(
                    self.broker,
                    stream=subjects.DATUMS_STREAM,
                    subject=subject,
                    what=what,
                    below=end + 1,
                )
            won = await self._end(job_key(pipeline, job), tally, state="killed", reason=reason)
            tally.done = True
            tally.results = {}
            if won:
                log.info("job %s@%s: killed: %s", pipeline, job, reason)
        self._ending.pop((pipeline, job), None)
        return won
