"""Publishing many JetStream messages with a bounded window, without a round trip per message.

Each message goes out as a plain publish with a reply subject on an inbox of ours; the stream's
answers (PubAcks) are matched by the reply's token. Compared with nats-py's `publish_async` (a
future, random token bytes and a JSON parse into a dataclass per message) this is a fraction of the
cost, which is what a planner queueing a million datums, or a worker reporting tiny datums, pays
per message.

Messages settle in publication order: `then(stored)` is called for each, `stored` True once the
stream has it. A message not answered within `timeout` (a lost answer, a broker restart) or
refused is published again, waiting this time; the stream's de-duplication by Nats-Msg-Id makes
that safe. Only when that fails too is `then(False)` called.

The planner queues a job's datums through one, and each worker publishes its results through one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from datumflow.broker.connection import TRANSIENT, Broker, broker_errors
from datumflow.errors import BrokerError, DatumflowError

log = logging.getLogger(__name__)

Then = Callable[[bool], Awaitable[None]]

_PENDING, _STORED, _FAILED = 0, 1, 2


class _Answer(msgspec.Struct):
    """The stream's answer to a publish: a PubAck, or an API error."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, object] | None = None


_answer = msgspec.json.Decoder(_Answer)


class _InFlight(msgspec.Struct):
    subject: str
    payload: bytes
    headers: dict[str, str]
    token: str
    sent: float
    then: Then | None
    state: int = _PENDING


class Outbox:
    def __init__(self, broker: Broker, *, window: int = 512, timeout: float = 10.0) -> None:
        self.broker = broker
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

    async def publish(
        self,
        subject: str,
        message: msgspec.Struct | bytes,
        *,
        msg_id: str,
        then: Then | None = None,
    ) -> None:
        """Send one message; returns once it is sent, before the stream has answered (unless
        the window is full)."""
        nc = self.broker.nc
        if self._sub is None:
            self._prefix = nc.new_inbox()
            async with broker_errors("subscribing to the answers of published messages"):
                self._sub = await nc.subscribe(f"{self._prefix}.*", cb=self._answered)
        while len(self._order) >= self.window:
            self._room.clear()
            await self._room.wait()
        self._count += 1
        token = str(self._count)
        payload = message if isinstance(message, bytes) else msgspec.json.encode(message)
        item = _InFlight(
            subject,
            payload,
            {"Nats-Msg-Id": msg_id},
            token,
            asyncio.get_running_loop().time(),
            then,
        )
        self._waiting[token] = item
        self._order.append(item)
        self._idle.clear()
        try:
            await nc.publish(
                subject, payload, reply=f"{self._prefix}.{token}", headers=item.headers
            )
        except (*TRANSIENT, nats.errors.Error):
            # Published again, waiting, when its turn comes; a message the client refuses (over
            # max_payload) is refused then by `Broker.publish`, saying why.
            self._waiting.pop(token, None)
            item.state = _FAILED
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._settler())
        self._progress.set()

    async def _answered(self, reply: Msg) -> None:
        item = self._waiting.pop(reply.subject.rpartition(".")[2], None)
        if item is None:
            return  # answered after we gave up waiting and published it again
        try:
            stored = bool(reply.data) and _answer.decode(reply.data).error is None
        except msgspec.DecodeError:
            stored = False
        # A status without data (503: no stream listens on the subject) is not stored either.
        item.state = _STORED if stored else _FAILED
        self._progress.set()

    async def _settler(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Everything answered at the head of the line settles without yielding: a burst of
            # answers is one pass here (and, for a worker, one write of acks to the broker).
            while self._order and self._order[0].state != _PENDING:
                item = self._order.popleft()
                try:
                    stored = item.state == _STORED or await self._again(item)
                    if item.then is not None:
                        await item.then(stored)
                except Exception:
                    log.exception("settling a message published to %s", item.subject)
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

    async def _again(self, item: _InFlight) -> bool:
        # Waiting this time, and as long as a publish waits for a stream without a leader: the
        # head of the line holds up the messages behind it, which is what should happen while
        # the stream cannot store any of them.
        try:
            await self.broker.publish(
                item.subject, item.payload, msg_id=item.headers["Nats-Msg-Id"]
            )
        except DatumflowError as exc:  # the broker's failures and refusals, wrapped
            log.warning("a message for %s was not stored: %s", item.subject, exc)
            return False
        return True

    async def flush(self) -> None:
        """Until every message published so far is settled; then let go of the inbox (the next
        publish takes a new one). Raises BrokerError if some message could not be stored and
        had no `then` to hear about it."""
        failed = 0

        async def note(stored: bool) -> None:
            nonlocal failed
            failed += not stored

        for item in self._order:
            if item.then is None:
                item.then = note
        await self._drained()
        await self._stop()
        if failed:
            raise BrokerError(f"{failed} messages could not be stored; publish them again")

    async def close(self) -> None:
        """Settle what can be within twice the timeout, then let go of the inbox."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._drained(), self.timeout * 2)
        await self._stop()

    async def _drained(self) -> None:
        if self._task is not None and not self._task.done():
            await self._idle.wait()

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        # Whatever was not settled is dropped: its answers would come to no one now.
        self._order.clear()
        self._waiting.clear()
        self._idle.set()
