"""A worker learns which of its pipeline's jobs have ended as the committer writes their records
(functions.worker.ended_jobs), against a real nats-server: the jobs ended are known, the running
ones and other pipelines' are not, and a value that is not a job record changes nothing."""

from __future__ import annotations

import msgspec
import pytest

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.records import JobInfo, JobState
from datumflow.functions.worker.ended_jobs import EndedJobs
from datumflow.pfs.pipelines import job_key
from tests.helpers import eventually

pytestmark = pytest.mark.asyncio


def record(pipeline: str, job: str, state: JobState) -> bytes:
    info = JobInfo(pipeline=pipeline, id=job, version=1, seq=1, created=0.0, state=state)
    return msgspec.json.encode(info)


async def test_jobs_ended_are_known_as_their_records_are_written(broker: Broker) -> None:
    ended = EndedJobs(broker, pipeline="edges")
    await ended.start()
    try:
        jobs = await broker.js.key_value(subjects.JOBS_BUCKET)
        await jobs.put(job_key("edges", "running"), record("edges", "running", "running"))
        await jobs.put(job_key("edges", "bad"), b"not a job record")
        await jobs.put(job_key("other", "theirs"), record("other", "theirs", "killed"))
        await jobs.put(job_key("edges", "killed"), record("edges", "killed", "killed"))
        await jobs.put(job_key("edges", "done"), record("edges", "done", "running"))
        await jobs.put(job_key("edges", "done"), record("edges", "done", "success"))

        # Written in order: once the last is seen, so are all the others.
        await eventually(lambda: "done" in ended, what="the ended job to be seen")
        assert "killed" in ended
        assert "running" not in ended
        assert "bad" not in ended
        assert "theirs" not in ended  # another pipeline's
    finally:
        await ended.close()
