"""A job's tally: what its datum results say, counted as they come.

Owns the rule that the first terminal result of each datum counts (any later one, a redelivery
that raced or a late worker after a max-deliveries failure, is ignored, so figures stay exact),
the job's figures and datum index made from it, and the failure reason a failed job reports.
"""

from __future__ import annotations

import msgspec

from datumflow.broker.messages import DatumResult, DatumStats, JobPlanned
from datumflow.broker.records import DatumIndexEntry, JobInfo

_replace = msgspec.structs.replace


class Tally:
    """What the committer knows of one job: its size once planned, and each datum's outcome.

    The figures are kept as results come, not summed from them each time: a job of a million
    datums is reported on many times."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.results: dict[str, DatumResult] = {}
        self.done = False
        self.counts = {"success": 0, "skipped": 0, "failed": 0, "recovered": 0}
        self.stats = DatumStats()

    def add(self, message: DatumResult | JobPlanned) -> None:
        if isinstance(message, JobPlanned):
            self.total = message.data_total
            return
        if message.datum in self.results:
            return  # the first terminal result counts
        self.results[message.datum] = message
        self.counts[message.state] += 1
        stats, more = self.stats, message.stats
        stats.download_time += more.download_time
        stats.process_time += more.process_time
        stats.upload_time += more.upload_time
        stats.download_bytes += more.download_bytes
        stats.upload_bytes += more.upload_bytes

    @property
    def complete(self) -> bool:
        return self.total is not None and len(self.results) >= self.total

    def figures(self, job: JobInfo) -> JobInfo:
        return _replace(
            job,
            data_total=self.total if self.total is not None else job.data_total,
            data_processed=self.counts["success"],
            data_skipped=self.counts["skipped"],
            data_failed=self.counts["failed"],
            data_recovered=self.counts["recovered"],
            stats=_replace(self.stats),
        )

    def index(self) -> list[DatumIndexEntry]:
        """The job's datum index: what the next job compares against to skip."""
        return [
            DatumIndexEntry(datum=r.datum, hash=r.hash, state=r.state, output=r.output)
            for r in sorted(self.results.values(), key=lambda r: r.datum)
        ]


def failure_reason(failed: list[DatumResult]) -> str:
    """`datum 1a2b3c4d5e6f (/poison.txt) failed: ...`: the datum a user should look at first."""
    first = failed[0]
    paths = [f.path for f in first.files[:3]]
    where = f" ({', '.join(paths)}{', ...' if len(first.files) > 3 else ''})" if paths else ""
    more = f" (and {len(failed) - 1} more failed datums)" if len(failed) > 1 else ""
    return f"datum {first.datum[:12]}{where} failed: {first.error}{more}"
