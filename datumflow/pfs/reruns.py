"""Rerunning the failed datums of a job: what `datumflow rerun job PIPELINE@JOB --failed` and the
console's button call.

A rerun is a new job on the same input commits as the job rerun. Its datums that were done there
(success or skipped, with the same hash) are carried over: reported skipped, their outputs kept;
every other datum (failed, recovered, or never run by a killed job) runs again. Its output commit
holds every datum's output once, and is a commit like any other for the pipelines downstream.

The request goes to the planner (`RerunRequest` on `df.rerun.<pipeline>`, read by the pipeline's
planner consumer with its commit events), so a rerun is planned in turn with them: one job at a
time per pipeline. Only the pipeline's newest job can be rerun: a rerun of an older one would put
the output of older inputs at the head of the output branch, over a newer job's.
"""

from __future__ import annotations

import asyncio
import hashlib

import msgspec

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.messages import RerunRequest
from datumflow.broker.records import DatumIndexEntry, JobInfo
from datumflow.broker.topology import ensure_rerun_subject
from datumflow.errors import PermanentError, TemporaryError
from datumflow.pfs.pipelines import Pipelines, job_key
from datumflow.pfs.repos import Repos
from datumflow.storage.base import ObjectStore

CARRIED = ("success", "skipped")
"""The states of a datum whose output a rerun keeps."""


class RerunRefused(PermanentError):
    """The job cannot be rerun as it is (still running, not the pipeline's newest, ...)."""


class NothingToRerun(RerunRefused):
    """The job has no failed datums: nothing was done."""


class Rerun(msgspec.Struct, kw_only=True, frozen=True):
    """A rerun the planner has started: `pipeline@new_job` runs `rerun` datums of `pipeline@job`
    again and carries `carried` over."""

    pipeline: str
    job: str
    new_job: str
    rerun: int
    carried: int


def rerun_job_id(pipeline: str, version: int, job: str) -> str:
    """The rerun's job id: from the pipeline, its version and the job rerun, so a request that
    comes twice plans one job, and a rerun of the rerun is another job."""
    return hashlib.sha256(f"rerun\0{pipeline}\0{version}\0{job}".encode()).hexdigest()[:32]


async def datum_index(store: ObjectStore, job: JobInfo) -> dict[str, DatumIndexEntry]:
    """The finished job's datum index by datum id ({} if it has none)."""
    if not job.datums:
        return {}
    entries = msgspec.json.decode(await store.get_bytes(job.datums), type=list[DatumIndexEntry])
    return {e.datum: e for e in entries}


async def rerun_failed(
    *, broker: Broker, store: ObjectStore, pipeline: str, job: str, timeout: float = 30.0
) -> Rerun:
    """Start a new job that runs the failed datums of `pipeline@job` again and carries the others
    over; return once the planner has created it (it is not waited for: `wait job`).

    NotFound for a pipeline or job that does not exist; RerunRefused for a job not finished, not
    the pipeline's newest, or with no datum index; NothingToRerun for a job with no failed datum;
    TemporaryError if no planner starts it within `timeout` seconds (the request stays queued)."""
    pipelines = Pipelines(broker=broker, repos=Repos(broker=broker, store=store))
    info = await pipelines.get(pipeline)
    old = await pipelines.get_job(pipeline, job)
    where = f"{pipeline}@{job}"
    if not old.done:
        raise RerunRefused(
            f"job {where} is {old.state}: wait for it to end (`datumflow wait job {where}`),"
            " then rerun its failed datums"
        )
    head = await pipelines.heads.find(pipeline)
    newest = head.last_job if head is not None else ""
    if newest != job:
        raise RerunRefused(
            f"job {where} is not the newest job of pipeline {pipeline} ({pipeline}@{newest} is):"
            " its output would replace the newer job's at the head of the output branch; rerun"
            " the newest job instead"
        )
    if old.state == "success":
        raise NothingToRerun(f"job {where} succeeded: it has no failed datums; nothing was done")
    if not old.datums:
        raise RerunRefused(
            f"job {where} ended before any datum ran ({old.reason or old.state}): there are no"
            " datums to rerun; fix the cause and commit again, or update the pipeline"
        )
    index = await datum_index(store, old)
    carried = sum(1 for e in index.values() if e.state in CARRIED)
    again = max(old.data_total, len(index)) - carried
    if again <= 0:
        raise NothingToRerun(
            f"job {where} has no failed datums (it ended {old.state}: {old.reason}); rerunning"
            " it would end the same way; nothing was done"
        )
    new_job = rerun_job_id(pipeline, info.version, job)
    await ensure_rerun_subject(broker, info.spec)
    await broker.publish(
        subjects.rerun(pipeline),
        RerunRequest(pipeline=pipeline, job=job, created=old.created),
        msg_id=f"rerun:{pipeline}:{job}:{old.created!r}",
    )
    await _started(pipelines, pipeline, job, new_job, timeout=timeout)
    return Rerun(pipeline=pipeline, job=job, new_job=new_job, rerun=again, carried=carried)


async def _started(
    pipelines: Pipelines, pipeline: str, job: str, new_job: str, *, timeout: float
) -> None:
    """Until the planner has created the rerun's job record; refused if another job came first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await pipelines.jobs.find(job_key(pipeline, new_job)) is None:
        head = await pipelines.heads.find(pipeline)
        newest = head.last_job if head is not None else ""
        if newest not in (job, new_job):
            raise RerunRefused(
                f"pipeline {pipeline} moved on before the rerun of {pipeline}@{job} started: job"
                f" {pipeline}@{newest} runs on newer input commits; nothing was rerun"
            )
        if loop.time() > deadline:
            raise TemporaryError(
                f"the rerun of {pipeline}@{job} is asked for, but no planner started it in"
                f" {timeout:.0f}s: is `datumflow up` running? It starts when a planner runs"
            )
        await asyncio.sleep(0.1)
