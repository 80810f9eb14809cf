"""Which of a pipeline's jobs have ended, learnt as the committer writes their records: so that a
worker does not start the user code of a datum whose job was killed while the datum waited in its
set.

A job killed (past its `job_timeout`) has its queued datums removed from the stream, but those a
worker has already fetched are in its hands: without this, each of them would still run. The
worker follows the job records of its pipeline as they are written (datumflow.broker.kv_writes);
a datum of a job seen ended is dropped when its turn comes. A write missed (the connection down
at that moment) only lets such a datum run, as one in hand always could: its late result changes
nothing.
"""

from __future__ import annotations

import logging

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.kv_writes import Writes
from datumflow.broker.records import JobInfo
from datumflow.errors import DatumflowError
from datumflow.pfs.pipelines import job_key

log = logging.getLogger(__name__)

KEEP = 256
"""Ended jobs remembered: a worker holds datums of a few jobs at most, the latest ones."""


class JobEnded(DatumflowError):
    """The datum's job has ended (killed): its user code is not started."""


class EndedJobs:
    """The jobs of `pipeline` seen ended since `start`."""

    def __init__(self, broker: Broker, *, pipeline: str) -> None:
        self._ended: dict[str, None] = {}
        """Job ids, oldest first."""
        self._writes = Writes(
            broker,
            bucket=subjects.JOBS_BUCKET,
            prefix=job_key(pipeline, ""),
            type=JobInfo,
            on_record=self._seen,
        )

    async def start(self) -> None:
        """Follow the pipeline's job records. If the broker refuses, no datum is ever dropped."""
        try:
            await self._writes.start()
        except DatumflowError as exc:
            log.warning("%s: datums of a killed job in hand will still run", exc)

    def _seen(self, job: JobInfo) -> None:
        if job.done and job.id not in self._ended:
            self._ended[job.id] = None
            while len(self._ended) > KEEP:
                del self._ended[next(iter(self._ended))]

    def __contains__(self, job: object) -> bool:
        return job in self._ended

    async def close(self) -> None:
        await self._writes.close()
