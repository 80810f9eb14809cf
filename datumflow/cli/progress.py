"""Live progress for the long waits (`wait job`, `wait commit`, `put file -r`): a bar per job or
transfer, with its counts, the time elapsed and an ETA.

Drawn on stderr, and only when stderr is a terminal and the command was not asked for `--json`:
a script, a pipe or a log file sees exactly what it saw before. rich is imported only when a bar
is drawn, so the commands start as fast as ever elsewhere.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

from datumflow.broker.records import JobInfo

REFRESH_PER_SECOND = 8


def wanted(*, as_json: bool = False) -> bool:
    """Whether to draw: not for --json, and only on a terminal."""
    return not as_json and sys.stderr.isatty()


class Bars:
    """A set of live bars, or nothing at all when `show` is false (every call is then a no-op)."""

    def __init__(self, *, show: bool) -> None:
        self.show = show
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> Bars:
        return self

    def _start(self) -> Any:
        """The live display, started with the first bar: a command that fails before it has
        anything to show (no such job) draws nothing."""
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            refresh_per_second=REFRESH_PER_SECOND,
        )
        progress.start()
        return progress

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.show = False
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def set(self, key: str, *, label: str, done: float, total: float | None, counts: str) -> None:
        """Create or move the bar `key`: `done` of `total` (None: not known yet), `counts` the
        text beside it (`12/40 datums, 2 failed`)."""
        if not self.show:
            return
        if self._progress is None:
            self._progress = self._start()
        task = self._tasks.get(key)
        if task is None:
            task = self._progress.add_task(label, total=total, counts=counts)
            self._tasks[key] = task
        self._progress.update(task, description=label, completed=done, total=total, counts=counts)


def job_counts(job: JobInfo) -> tuple[int, int | None, str]:
    """(datums done, total or None before the job is planned, the text): `12/40 datums, 2 failed`."""
    done = job.data_processed + job.data_skipped + job.data_failed + job.data_recovered
    total = None if job.state == "created" else job.data_total
    text = f"{done}/{total if total is not None else '?'} datums"
    if job.data_skipped:
        text += f", {job.data_skipped} skipped"
    if job.data_failed:
        text += f", {job.data_failed} failed"
    return done, total, text


def show_job(bars: Bars, job: JobInfo) -> None:
    """One job's bar: its datums done (processed, skipped, failed or recovered) of its total."""
    done, total, text = job_counts(job)
    if job.done:
        text += f" — {job.state}"
    bars.set(job.id, label=f"{job.pipeline}@{job.id[:12]}", done=done, total=total, counts=text)
