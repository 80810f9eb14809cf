"""Datum sets: how many datums a worker fetches at once, keeping them alive together, and settling
them without a round trip per datum.

- `BatchSizer`: `datum_set_spec.number` fixes the size of a set; `per_worker` splits what is
  pending into `parallelism * per_worker` sets; `size_bytes` sizes sets by the input bytes seen so
  far. Without a `datum_set_spec`, an in-process function's sets adapt: a set holds about `TARGET`
  seconds of work, so tiny datums come in hundreds and a datum of a second comes alone (no worker
  sits on work another could take); and no more than the worker's share of what the queue still
  holds (each delivery says how much), so a job's last datums are shared among its workers. A
  command's sets are single datums unless the spec asks otherwise; a set it asks for is
  overlapped (functions.worker.overlap), and a datum of it whose job is killed meanwhile is
  dropped unrun (functions.worker.ended_jobs).
- `Heartbeat`: one task that sends `in_progress()` for every datum message in hand, well inside
  `ack_wait`, so the datums waiting in a set are not redelivered while their worker is alive.

Results are reported, and their datums acked, by functions.worker.reporter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

from datumflow.broker.settle import Msg, keep_alive
from datumflow.spec import DatumSetSpec

log = logging.getLogger(__name__)

TARGET = 0.2
"""Seconds of work an adaptive datum set aims at: long enough to make the per-fetch cost vanish
for tiny datums, short enough that the last sets of a job spread over every worker."""
MAX_SET = 1024
"""Datums fetched at once, whatever the spec asks: each one is a message held and heartbeated."""


class BatchSizer:
    """How many datums the next fetch asks for."""

    def __init__(
        self, spec: DatumSetSpec | None, *, parallelism: int, adaptive: bool = True
    ) -> None:
        self.spec = spec or DatumSetSpec()
        self.parallelism = max(parallelism, 1)
        self.adaptive = adaptive
        self._seconds: float | None = None
        """Moving average of the time one datum takes, fetch to result."""
        self._bytes: float | None = None
        """Moving average of one datum's input bytes."""
        self._waiting: int | None = None
        """Datums the queue still held after the last fetch (`waiting`); None: not known."""

    @property
    def needs_pending(self) -> bool:
        """`per_worker` sizes sets from the datums still waiting: the caller looks them up."""
        return self.spec.number <= 0 and self.spec.per_worker > 0

    def size(self, pending: int = 0) -> int:
        spec = self.spec
        if spec.number > 0:
            wanted = spec.number
        elif spec.per_worker > 0:
            wanted = math.ceil(pending / (self.parallelism * spec.per_worker))
        elif spec.size_bytes > 0:
            wanted = int(spec.size_bytes / self._bytes) if self._bytes else 1
        elif not self.adaptive or self._seconds is None:
            wanted = 1  # nothing known yet: one datum, and measure it
        else:
            wanted = int(TARGET / max(self._seconds, 1e-6))
            if self._waiting is not None:
                # The job's last datums shared among the workers, rather than taken a whole set
                # by one while the others sit idle: the job ends when its last set does.
                wanted = min(wanted, math.ceil(self._waiting / self.parallelism))
        return min(max(wanted, 1), MAX_SET)

    def waiting(self, datums: int | None) -> None:
        """The queue held `datums` more after the set just fetched (None: not known)."""
        self._waiting = datums

    def observe(self, *, datums: int, seconds: float, input_bytes: int) -> None:
        if datums <= 0:
            return
        each, size = seconds / datums, input_bytes / datums
        # Weighted by how much was seen: one slow set does not undo a thousand fast datums at once.
        weight = min(datums / 16, 1.0)
        self._seconds = each if self._seconds is None else _mix(self._seconds, each, weight)
        self._bytes = size if self._bytes is None else _mix(self._bytes, size, weight)


def _mix(old: float, new: float, weight: float) -> float:
    return old + (new - old) * max(weight, 0.2)


class Heartbeat:
    """Keeps every held datum message from being redelivered while this worker lives."""

    def __init__(self, *, every: float) -> None:
        self.every = every
        self._held: dict[int, Msg] = {}
        self._task: asyncio.Task[None] | None = None

    def hold(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            self._held[id(msg)] = msg
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._beat())

    def release(self, msg: Msg) -> None:
        self._held.pop(id(msg), None)

    def holding(self, msg: Msg) -> bool:
        return id(msg) in self._held

    def __len__(self) -> int:
        return len(self._held)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            await keep_alive(list(self._held.values()))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
