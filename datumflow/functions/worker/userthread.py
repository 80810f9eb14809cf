"""The thread in-process user code runs on, so that the event loop stays free for heartbeats,
fetches and results while a datum runs.

A datum set is handed to the thread in one go (`UserThread.each`): the thread runs the datums one
after another and reports each one as it finishes, while the loop publishes the results of the
ones before. There is no round trip between the two per datum, only a wake-up.

Past `datum_timeout` the datum in hand is given up: `DatumTimeout` is raised inside the user code
at its next Python instruction, the thread is abandoned (a thread cannot be killed; it is a daemon,
so it never holds up exit), and the rest of the set goes on on a fresh thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from queue import SimpleQueue
from typing import Any, TypeVar

T = TypeVar("T")

REPORT = 0.25
"""Seconds between two reports of finished jobs to the loop, at most one per job. Each report
costs a message of results, its acks, and the committer's round of pull requests: with datum sets
of about 0.2 s of work (functions.worker.batch), a set of quick datums is mostly one report."""

Job = Callable[[int], Any]
"""Work for the user-code thread; it is given the thread's number (see UserThread.generation)."""


class DatumTimeout(BaseException):
    """Raised inside user code that ran past `datum_timeout`. A BaseException, so that the user's
    own `except Exception` does not swallow it."""


class _Lane(threading.Thread):
    """A daemon thread running jobs one after another."""

    def __init__(self, number: int) -> None:
        super().__init__(name=f"datumflow-user-code-{number}", daemon=True)
        self.number = number
        self.jobs: SimpleQueue[Job | None] = SimpleQueue()

    def run(self) -> None:
        try:
            while (job := self.jobs.get()) is not None:
                job(self.number)
        except DatumTimeout:
            pass  # it came just after the abandoned job had returned: this thread is done anyway


class _Chunk:
    """Jobs run in order on one lane; shared with the loop, which reads what is done."""

    def __init__(
        self,
        jobs: Sequence[Job],
        loop: asyncio.AbstractEventLoop,
        on_last: Callable[[], None] | None = None,
    ) -> None:
        self.jobs = jobs
        self.loop = loop
        self.on_last = on_last
        """Called on the loop when the lane starts the last job."""
        self.wake = asyncio.Event()
        self.done: list[Any] = []
        """Each job's result, or the Exception it raised; appended by the lane only."""
        self.index = -1
        """The job in hand; set before `started`."""
        self.started = 0.0
        self.halt = False
        self.finished = False
        self.reported = time.monotonic()
        """When the lane last woke the loop for a result (at first: when the chunk started).
        Jobs done within REPORT of it go out together with a later one, or at the end."""

    def __call__(self, lane: int) -> None:
        try:
            for i, job in enumerate(self.jobs):
                if self.halt:
                    break
                self.index = i
                self.started = time.monotonic()
                if self.on_last is not None and i == len(self.jobs) - 1:
                    with contextlib.suppress(RuntimeError):  # the loop closed
                        self.loop.call_soon_threadsafe(self.on_last)
                try:
                    result = job(lane)
                except Exception as exc:  # the loop decides what a job's error means
                    result = exc
                self.done.append(result)
                # Tiny jobs are reported in groups: one wake-up of the loop, and one write to
                # the broker, for many results. While jobs finish that fast, the loop also looks
                # for results a group left unreported (see Run._overdue).
                now = time.monotonic()
                if now - self.reported >= REPORT:
                    self.reported = now
                    self._notify()
        finally:
            self.finished = True
            self._notify()

    def _notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed while the job ran
            self.loop.call_soon_threadsafe(self.wake.set)


class Run:
    """One datum set on the user-code thread: iterate for (index, result) as jobs finish."""

    def __init__(
        self,
        thread: UserThread,
        jobs: Sequence[Job],
        *,
        timeout: float | None,
        on_last: Callable[[], None] | None = None,
    ) -> None:
        self.thread = thread
        self.jobs = jobs
        self.timeout = timeout
        self.on_last = on_last
        self._halted = False
        self._chunk: _Chunk | None = None

    def halt(self) -> None:
        """Start nothing more after the job in hand; the iteration ends when it is done."""
        self._halted = True
        if self._chunk is not None:
            self._chunk.halt = True

    def __aiter__(self) -> AsyncGenerator[tuple[int, Any], None]:
        return self._results()

    async def _results(self) -> AsyncGenerator[tuple[int, Any], None]:
        loop = asyncio.get_running_loop()
        offset = 0
        while offset < len(self.jobs) and not self._halted:
            chunk = self._chunk = _Chunk(self.jobs[offset:], loop, self.on_last)
            lane = self.thread._current()
            lane.jobs.put(chunk)
            seen = 0
            timed_out = False
            try:
                while True:
                    chunk.wake.clear()
                    while seen < len(chunk.done):
                        yield offset + seen, chunk.done[seen]
                        seen += 1
                    if chunk.finished and seen == len(chunk.done):
                        break
                    if seen < len(chunk.done):
                        continue
                    if await self._overdue(chunk, seen):
                        self.thread._abandon(lane)
                        yield offset + seen, DatumTimeout(f"ran longer than {self.timeout:g}s")
                        timed_out = True
                        break
            except BaseException:
                # Cancelled, or the consumer stopped iterating: leave nothing running behind.
                chunk.halt = True
                if not chunk.finished and len(chunk.done) <= chunk.index:
                    self.thread._abandon(lane)  # a job is in hand: interrupt it
                raise
            offset += seen + 1 if timed_out else seen
            if chunk.halt:
                return

    async def _overdue(self, chunk: _Chunk, seen: int) -> bool:
        """Wait for the lane's next report; True when the job in hand ran past the timeout.

        A result goes unreported only when it came less than REPORT after the last report (or
        the chunk's start); so until REPORT has passed since then, look again when it has. From
        then on any new result is reported: wait for it, however long the job takes."""
        now = time.monotonic()
        since = now - chunk.reported
        wait = REPORT - since if since < REPORT else None
        if self.timeout is not None:
            # The job in hand is `seen` once the lane has started it; until then look again soon.
            left = chunk.started + self.timeout - now if chunk.index == seen else REPORT
            wait = left if wait is None else min(wait, left)
        try:
            await asyncio.wait_for(chunk.wake.wait(), None if wait is None else max(wait, 0.001))
        except TimeoutError:
            pass
        if len(chunk.done) > seen or chunk.finished:
            return False
        return (
            self.timeout is not None
            and chunk.index == seen
            and time.monotonic() - chunk.started >= self.timeout
        )


class UserThread:
    """Where user code runs: one thread, replaced when a job has to be abandoned."""

    def __init__(self) -> None:
        self._lane: _Lane | None = None
        self._number = 0

    @property
    def generation(self) -> int:
        """The number of the thread the next job runs on. It changes when a job is abandoned:
        a new thread, with its own layout directory, since the old one may still write in its."""
        return self._current().number

    def waited(self) -> float:
        """Seconds the thread has spent so far ready to run but waiting for a CPU (Linux's
        schedstat; 0.0 where it cannot be read). Set sizes leave this out: on a busy machine a
        datum's wall time is mostly this wait, and sets sized by it would shrink to one datum,
        each paying the round trips a set amortizes."""
        lane = self._lane
        if lane is None or lane.native_id is None:
            return 0.0
        try:
            with open(f"/proc/self/task/{lane.native_id}/schedstat", "rb") as f:
                return int(f.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return 0.0

    def _current(self) -> _Lane:
        if self._lane is None:
            self._number += 1
            self._lane = _Lane(self._number)
            self._lane.start()
        return self._lane

    def each(
        self,
        jobs: Sequence[Job],
        *,
        timeout: float | None = None,
        on_last: Callable[[], None] | None = None,
    ) -> Run:
        """Run `jobs` in order; each one past `timeout` seconds yields DatumTimeout. `on_last` is
        called on the loop when the last job starts (the caller fetches the next ones then)."""
        return Run(self, jobs, timeout=timeout, on_last=on_last)

    async def run(self, job: Job) -> Any:
        """One job, its result returned (its exception raised); for short work (a layout)."""
        chunk = _Chunk([job], asyncio.get_running_loop())
        self._current().jobs.put(chunk)
        while not chunk.finished:
            chunk.wake.clear()
            if not chunk.finished:
                await chunk.wake.wait()
        if not chunk.done:
            raise DatumTimeout("the user-code thread was given up")
        result = chunk.done[0]
        if isinstance(result, Exception):
            raise result
        return result

    def _abandon(self, lane: _Lane) -> None:
        if lane is not self._lane:
            return
        self._lane = None
        lane.jobs.put(None)  # it ends after the job in hand, if that job ever returns
        if lane.ident is not None:
            # Interrupt the user code at its next Python instruction; code blocked in C (a sleep,
            # a read) sees it when that returns.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(lane.ident), ctypes.py_object(DatumTimeout)
            )

    def close(self) -> None:
        if self._lane is not None:
            self._lane.jobs.put(None)
            self._lane = None
