"""Job timeouts: a job that runs longer than its pipeline's `job_timeout` is KILLED.

Owns when a job is overdue and how often to look; the kill itself (queued datums removed, the job
ended KILLED) is the committer's, which also ends jobs that finish, one at a time per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from datumflow.broker.records import PipelineInfo
from datumflow.errors import BrokerError, SpecError, Superseded
from datumflow.pfs.pipelines import Pipelines, job_key
from datumflow.spec import parse_duration

log = logging.getLogger(__name__)

DEADLINE_CHECK = 1.0
"""Seconds between two looks at the running jobs' `job_timeout`."""


class JobKiller(Protocol):
    """What kills a job: the committer."""

    pipelines: Pipelines

    async def kill(self, pipeline: str, job: str, *, why: str) -> bool: ...


class JobTimeouts:
    """Kills the jobs that run longer than their pipeline's `job_timeout`.

    A pipeline runs one job at a time, its newest (the job head), so one look per pipeline with a
    timeout finds every job to kill. The clock starts when the job starts running, i.e. once its
    datums are queued, as Pachyderm's does when the job starts.
    """

    def __init__(
        self, *, committer: JobKiller, every: float = DEADLINE_CHECK, refresh: float = 5.0
    ) -> None:
        self.committer = committer
        self.pipelines = committer.pipelines
        self.every = every
        self.refresh = refresh
        self._bounded: list[PipelineInfo] = []
        self._listed: float | None = None

    async def _pipelines_with_timeouts(self) -> list[PipelineInfo]:
        # Listing every pipeline is a round trip per pipeline: done every `refresh` seconds,
        # while the jobs of the ones with a timeout are looked at every `every` seconds.
        now = time.monotonic()
        if self._listed is None or now - self._listed >= self.refresh:
            self._bounded = [p for p in await self.pipelines.list() if p.spec.job_timeout]
            self._listed = now
        return self._bounded

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.check()
            except BrokerError as exc:
                log.warning("committer: checking job timeouts: %s", exc)
            except Superseded:
                return  # the committer stops with it
            except Exception:
                log.exception("committer: checking job timeouts")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.every)

    async def check(self, now: float | None = None) -> list[str]:
        """Kill what is overdue; returns the jobs killed as PIPELINE@JOB."""
        now = time.time() if now is None else now
        killed = []
        for info in await self._pipelines_with_timeouts():
            try:
                limit = parse_duration(info.spec.job_timeout, field="job_timeout")
            except SpecError:
                continue  # refused at create; an older record cannot stop the others
            if not limit:
                continue
            head = await self.pipelines.heads.find(info.name)
            if head is None or not head.last_job:
                continue
            job = await self.pipelines.jobs.find(job_key(info.name, head.last_job))
            if job is None or job.state != "running" or not job.started:
                continue
            if now - job.started < limit:
                continue
            why = f"job_timeout: the job ran longer than {info.spec.job_timeout} and was killed"
            if await self.committer.kill(info.name, job.id, why=why):
                killed.append(f"{info.name}@{job.id}")
        return killed
