"""Datum sets: how many datums a worker fetches at once, keeping them alive together, and settling
them without a round trip per datum.

- `BatchSizer`: `datum_set_spec.number` fixes the size of a set; `per_worker` splits what is
  pending into `parallelism * per_worker` sets; `size_bytes` sizes sets by the input bytes seen so
  far. Without a `datum_set_spec`, an in-process function's sets adapt: a set holds about `TARGET`
  seconds of work, so tiny datums come in hundreds and a datum of a second comes alone (no worker
  sits on work another could take). A command's datum costs a process start, more than a fetch: its
  sets are single datums unless the spec asks otherwise.
- `Heartbeat`: one task that sends `in_progress()` for every datum message in hand, well inside
  `ack_wait`, so the datums waiting in a set are not redelivered while their worker is alive.
- `Settler`: publishes each result without waiting and acks its datum once the stream has stored
  the result (invariant 4), in publication order, with a bounded window of results in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque

import msgspec
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from datumflow.broker.connection import TRANSIENT, Broker, broker_errors
from datumflow.errors import BrokerError
from datumflow.spec import DatumSetSpec

log = logging.getLogger(__name__)

TARGET = 0.05
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
        return min(max(wanted, 1), MAX_SET)

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
            for msg in list(self._held.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


_PENDING, _STORED, _FAILED = 0, 1, 2


class _Answer(msgspec.Struct):
    """The stream's answer to a publish (a JetStream PubAck, or an API error)."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict | None = None


_answer = msgspec.json.Decoder(_Answer)


class _InFlight(msgspec.Struct):
    msg: Msg
    subject: str
    payload: bytes
    headers: dict[str, str]
    token: str
    sent: float
    state: int = _PENDING


class Settler:
    """Publishes results in a window and acks each datum once its result is stored.

    Results are published with a reply subject on an inbox of ours, rather than through
    nats-py's `publish_async` (a future, a random token and a JSON parse into a dataclass per
    message, which a tiny datum notices). The answers are matched by token; datums are acked in
    publication order, each once its result is stored; a result not stored within `timeout` (a
    lost answer, a broker restart) is published again, waiting this time; the stream's
    de-duplication by Nats-Msg-Id makes that safe.
    """

    def __init__(
        self, broker: Broker, heartbeat: Heartbeat, *, window: int = 512, timeout: float = 10.0
    ) -> None:
        self.broker = broker
        self.heartbeat = heartbeat
        self.window = window
        self.timeout = timeout
        self._order: deque[_InFlight] = deque()
        self._waiting: dict[str, _InFlight] = {}
        self._progress = asyncio.Event()
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._prefix = ""
        self._sub: Subscription | None = None
        self._count = 0
        self._task: asyncio.Task[None] | None = None

    async def _answered(self, reply: Msg) -> None:
        item = self._waiting.pop(reply.subject.rpartition(".")[2], None)
        if item is None:
            return  # answered after we gave up waiting and published it again
        try:
            stored = bool(reply.data) and _answer.decode(reply.data).error is None
        except msgspec.DecodeError:
            stored = False
        # A status without data (503: no stream listens) is not stored either.
        item.state = _STORED if stored else _FAILED
        self._progress.set()

    async def publish(
        self, msg: Msg, subject: str, message: msgspec.Struct, *, msg_id: str
    ) -> None:
        """Send the result of `msg`'s datum; returns before the stream has answered."""
        nc = self.broker.nc
        if self._sub is None:
            self._prefix = nc.new_inbox()
            self._sub = await nc.subscribe(f"{self._prefix}.*", cb=self._answered)
        while len(self._order) >= self.window:
            self._room.clear()
            await self._room.wait()
        self._count += 1
        token = str(self._count)
        loop = asyncio.get_running_loop()
        item = _InFlight(
            msg, subject, msgspec.json.encode(message), {"Nats-Msg-Id": msg_id}, token, loop.time()
        )
        self._waiting[token] = item
        self._order.append(item)
        self._idle.clear()
        try:
            await nc.publish(
                subject, item.payload, reply=f"{self._prefix}.{token}", headers=item.headers
            )
        except TRANSIENT:
            self._waiting.pop(token, None)
            item.state = _FAILED  # the acker publishes it again, waiting this time
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._acker())
        self._progress.set()

    async def _acker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Everything answered at the head of the line is settled without yielding: a burst
            # of answers becomes one write of acks to the broker.
            while self._order and self._order[0].state != _PENDING:
                item = self._order.popleft()
                try:
                    await self._settle(item)
                except Exception:
                    # Unacked, the datum comes back after ack_wait: never let one stop the rest.
                    log.exception("settling the result of a datum from %s", item.msg.subject)
                finally:
                    self.heartbeat.release(item.msg)
            if len(self._order) < self.window:
                self._room.set()
            if not self._order:
                self._idle.set()
                self._progress.clear()
                await self._progress.wait()
                continue
            head = self._order[0]
            self._progress.clear()
            try:
                await asyncio.wait_for(
                    self._progress.wait(), head.sent + self.timeout - loop.time()
                )
            except TimeoutError:
                if head.state == _PENDING:
                    self._waiting.pop(head.token, None)
                    head.state = _FAILED  # no answer: publish it again, waiting this time

    async def _settle(self, item: _InFlight) -> None:
        stored = item.state == _STORED or await self._again(item)
        with contextlib.suppress(*TRANSIENT):
            if stored:
                await item.msg.ack()
            else:
                # Not stored: the datum comes back and is done again (its result id dedupes).
                await item.msg.nak(delay=1)

    async def _again(self, item: _InFlight) -> bool:
        async def once() -> None:
            async with broker_errors(f"publishing to {item.subject}"):
                await self.broker.js.publish(item.subject, item.payload, headers=item.headers)

        try:
            await self.broker.retry(f"publishing to {item.subject}", once, attempts=5)
        except (BrokerError, nats.js.errors.Error) as exc:
            log.warning(
                "result for %s not stored (%s); the datum will be redone", item.subject, exc
            )
            return False
        return True

    async def drain(self) -> None:
        """Until every result published so far is stored and its datum acked."""
        if self._task is not None and not self._task.done():
            await self._idle.wait()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.drain(), timeout=self.timeout * 2)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
