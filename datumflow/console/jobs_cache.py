"""The jobs the console lists, kept in memory: listed once, then followed as they are written.

Every open page asks for the jobs every second and a half, and listing the jobs bucket costs the
broker a request per job (datumflow.broker.kv): a page left open on a cluster with thousands of
jobs kept the broker busy answering the same question. So the console lists the jobs once, then
follows the writes to the bucket as their writers publish them (datumflow.broker.kv_writes): a
job written is in the next answer, a job deleted is out of it, and nothing is asked of the
broker while nothing is written. Those writes come without a guarantee (one made while the
connection was down is missed), so the bucket is listed again once the connection is back, and
every RELIST seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.kv import Records
from datumflow.broker.kv_writes import Writes
from datumflow.broker.records import JobInfo
from datumflow.errors import BrokerError
from datumflow.pfs.pipelines import job_key

log = logging.getLogger(__name__)

RELIST = 60.0
"""Seconds after which the jobs are listed again though no write was missed, as far as we know."""

Change = tuple[str, JobInfo | None]
"""A job written (its key and record), or deleted (its key and None)."""


class JobsCache:
    def __init__(self, *, broker: Broker, records: Records[JobInfo]) -> None:
        self.broker = broker
        self.records = records
        self._jobs: dict[str, JobInfo] | None = None
        self._listed_at = 0.0
        self._reconnects = 0
        self._during: list[Change] | None = None
        """The changes seen while a listing is under way, applied over it once it is done."""
        self._writes = Writes(
            broker,
            bucket=subjects.JOBS_BUCKET,
            prefix="",
            type=JobInfo,
            on_record=lambda job: self._changed(job_key(job.pipeline, job.id), job),
            on_delete=lambda key: self._changed(key, None),
        )
        self._following = False
        self._listing = asyncio.Lock()

    async def all(self) -> list[JobInfo]:
        """Every job, as of the last write seen."""
        if not self._following:
            try:
                await self._writes.start()
                self._following = True
            except BrokerError as exc:
                log.warning("console: not following the jobs' writes (%s); listing them", exc)
        asked = time.monotonic()
        async with self._listing:  # pages asking at once: one listing, for all of them
            reconnects = self.broker.nc.stats["reconnects"]
            if (
                self._jobs is None
                or (not self._following and self._listed_at < asked)
                or reconnects != self._reconnects
                or asked - self._listed_at > RELIST
            ):
                self._reconnects = reconnects
                await self._list()
            assert self._jobs is not None
            return list(self._jobs.values())

    async def _list(self) -> None:
        started = time.monotonic()
        self._during = []
        try:
            listed = await self.records.all()
        finally:
            during, self._during = self._during, None
        jobs = {job_key(job.pipeline, job.id): job for job in listed}
        # A change seen during the listing is at least as new as what the listing read.
        for key, job in during:
            _apply(jobs, key, job)
        self._jobs, self._listed_at = jobs, started

    def _changed(self, key: str, job: JobInfo | None) -> None:
        if self._during is not None:
            self._during.append((key, job))
        if self._jobs is not None:
            _apply(self._jobs, key, job)

    async def close(self) -> None:
        await self._writes.close()


def _apply(jobs: dict[str, JobInfo], key: str, job: JobInfo | None) -> None:
    if job is None:
        jobs.pop(key, None)
    else:
        jobs[key] = job
