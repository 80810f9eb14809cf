"""Packing a job's datums into set messages: several datums a message for in-process functions.

A datum message costs the planner a publish, the broker a store and a delivery, and the worker a
fetch, a decode and an ack. For an in-process function's tiny datums that is more than the datum
itself, so the planner sends their datums `SET_DATUMS` to a message (`DatumTask.more`), and the
worker runs, reports and retries each on its own (broker.set_parts). Commands keep a message a
datum: a process per datum costs far more than its message, and a datum's message is what a
worker's crash gives back (only the datums not reported done, for `datum_batching`).

A job ends when its last set does, and sets cannot be split once sent: the last datums of a job
go out in ever smaller sets (guided self-scheduling), down to one datum a message, so that every
worker has a share of the end. The planner holds back `window` datums to know where the end is.
A `datum_set_spec.number` is kept as it is, as Pachyderm keeps it: sets of that many datums (the
last one of a job smaller), each one message (up to MAX_SET datums and SET_BYTES), which a worker
takes alone.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from datumflow.broker import subjects
from datumflow.broker.messages import DatumTask
from datumflow.broker.outbox import Outbox
from datumflow.spec import PipelineSpec

SET_DATUMS = 16
"""Datums a set message holds at most, unless `datum_set_spec.number` asks for more."""
MAX_SET = 1024
"""Datums a set message holds at most, whatever the spec asks."""
SET_BYTES = 256 << 10
"""A set message holds at most this many bytes of datums (beyond one datum): well inside the
broker's 1 MiB."""
YIELD_EVERY = 32
"""Set messages published between two turns given to the event loop, once past the first ones."""
UNKNOWN_WORKERS = 16
"""Workers assumed when the parallelism depends on the cluster's nodes: more small sets at the
end of a job than needed costs little; fewer leave workers idle."""


def set_size(spec: PipelineSpec) -> int:
    """Datums a message of `spec`'s jobs holds at most: 1 for commands, else the datum set's
    `number` if the spec fixes one."""
    if not spec.transform.function:
        return 1
    number = fixed_number(spec)
    return min(number, MAX_SET) if number > 0 else SET_DATUMS


def fixed_sets(spec: PipelineSpec) -> bool:
    """Whether the planner sends `spec`'s datums in sets of `datum_set_spec.number`: a worker
    then takes one message, one set, at a time."""
    return set_size(spec) > 1 and fixed_number(spec) > 0


def fixed_number(spec: PipelineSpec) -> int:
    """`datum_set_spec.number`, 0 if not set."""
    return spec.datum_set_spec.number if spec.datum_set_spec else 0


def set_workers(spec: PipelineSpec) -> int:
    """Workers the end of a job is shared among."""
    return spec.parallelism_spec.constant or UNKNOWN_WORKERS


class Packer:
    """Publishes one job's datum tasks, in set messages of at most `size` datums."""

    def __init__(
        self, publisher: Outbox, *, pipeline: str, size: int, workers: int, shrink: bool = True
    ) -> None:
        self.publisher = publisher
        self.subject = subjects.datum(pipeline)
        self.size = max(size, 1)
        self.workers = max(workers, 1)
        self.shrink = shrink
        self.hold_back = self.size * self.workers * 4 if shrink else 0
        """Datums held back until the job's end, to send them in shrinking sets."""
        self._held: deque[tuple[DatumTask, bytes]] = deque()
        self._sent = 0

    @classmethod
    def for_spec(cls, publisher: Outbox, spec: PipelineSpec) -> Packer:
        """The packer of a job of `spec`."""
        return cls(
            publisher,
            pipeline=spec.name,
            size=set_size(spec),
            workers=set_workers(spec),
            shrink=not fixed_number(spec),
        )

    async def add(self, task: DatumTask, payload: bytes) -> None:
        """Queue `task` (`payload` is its encoding)."""
        if self.size == 1:
            await self._publish([(task, payload)])
            return
        self._held.append((task, payload))
        if len(self._held) >= self.hold_back + self.size:
            await self._publish(self._take(self.size))

    async def finish(self) -> None:
        """The job's last datums, in sets that shrink to one datum."""
        while self._held:
            share = math.ceil(len(self._held) / (2 * self.workers)) if self.shrink else self.size
            await self._publish(self._take(min(share, self.size)))

    def _take(self, count: int) -> list[tuple[DatumTask, bytes]]:
        taken = [self._held.popleft()]
        size = len(taken[0][1])
        while self._held and len(taken) < count and size + len(self._held[0][1]) <= SET_BYTES:
            taken.append(self._held.popleft())
            size += len(taken[-1][1])
        return taken

    async def _publish(self, tasks: list[tuple[DatumTask, bytes]]) -> None:
        first, payload = tasks[0]
        if len(tasks) == 1:
            await self.publisher.publish(self.subject, payload, msg_id=f"{first.job}:{first.datum}")
            return
        # The first datum's JSON object with `more` added, made of the encodings the planner made
        # anyway (to check each datum's size): encoding the datums again costs more than this.
        whole = b"".join((payload[:-1], b',"more":[', b",".join(p for _, p in tasks[1:]), b"]}"))
        await self.publisher.publish(
            self.subject, whole, msg_id=f"{first.job}:set:{first.datum}:{len(tasks)}"
        )
        self._sent += 1
        sent = self._sent
        if sent % YIELD_EVERY == 0 or sent & (sent - 1) == 0:
            # A publish returns without yielding to the loop until the outbox's window is full,
            # and only the loop writes to the broker: without a turn now and then, a job's first
            # sets would wait for hundreds more (100 ms for tiny datums) before any worker saw
            # them. A turn after sets 1, 2, 4, 8, 16, then every 32: work for the workers from
            # the first set on, without a write of its own for each set, which costs the
            # planner and the broker more than it saves.
            await asyncio.sleep(0)
