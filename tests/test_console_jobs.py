"""The console's list of jobs (datumflow.console.jobs_cache) on a real nats-server: listed once,
then kept up to date from the writes to the jobs bucket, so that pages polling it every second
and a half ask nothing of the broker while no job is written."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.msg import Msg

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.records import JobInfo
from datumflow.broker.topology import ensure_topology
from datumflow.console.views import Views
from datumflow.pfs.pipelines import job_key
from datumflow.storage.file import FileStore
from tests.helpers import eventually

pytestmark = pytest.mark.asyncio


def job(pipeline: str, n: int) -> JobInfo:
    return JobInfo(pipeline=pipeline, id=f"j{n}", version=1, seq=n, created=1_000.0 + n)


def ids(jobs: list[dict[str, Any]]) -> list[str]:
    return [j["id"] for j in jobs]


async def test_the_jobs_listed_follow_their_writes_without_listing_the_bucket_again(
    broker: Broker, tmp_path: Path
) -> None:
    await ensure_topology(broker)
    views = Views(broker=broker, store=FileStore(tmp_path / "objects"))
    records = views.pipelines.jobs
    listings: list[Msg] = []

    async def listing(msg: Msg) -> None:
        if b"subjects_filter" in msg.data:  # a listing's first request, not a look at the bucket
            listings.append(msg)

    jobs_stream = subjects.kv_stream(subjects.JOBS_BUCKET)
    await broker.nc.subscribe(f"{subjects.JS_API}.STREAM.INFO.{jobs_stream}", cb=listing)
    await records.create(job_key("p", "j1"), job("p", 1))
    try:
        # Pages asking at once share one listing.
        answers = await asyncio.gather(*(views.jobs() for _ in range(3)))
        assert [ids(a) for a in answers] == [["j1"]] * 3
        for _ in range(3):  # pages polling while nothing is written
            assert ids(await views.jobs()) == ["j1"]
        await broker.nc.flush()
        assert len(listings) == 1

        # A new job, another pipeline's, and an update: each in the answers that follow.
        await records.create(job_key("p", "j2"), job("p", 2))
        await records.create(job_key("q", "j3"), job("q", 3))
        await records.update(
            job_key("p", "j1"), lambda j: msgspec.structs.replace(j, state="success")
        )
        listed = await eventually(
            views.jobs,
            until=lambda jobs: ids(jobs) == ["j3", "j2", "j1"] and jobs[2]["state"] == "success",
            timeout=10,
            interval=0.05,
            what="the new jobs and the update, newest first",
        )
        assert [j["pipeline"] for j in listed] == ["q", "p", "p"]
        # A job deleted (its pipeline was) is gone from them.
        await records.delete(job_key("p", "j2"))
        await eventually(
            views.jobs,
            until=lambda jobs: ids(jobs) == ["j3", "j1"],
            timeout=10,
            interval=0.05,
            what="the deleted job gone",
        )
        await broker.nc.flush()
        assert len(listings) == 1, "the bucket was listed again"
    finally:
        await views.close()
