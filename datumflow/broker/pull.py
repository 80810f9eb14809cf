"""The raw JetStream pull protocol: fetching batches (a worker's datum sets, the committer's
results) from a durable pull consumer with plain pull requests on a private inbox.

nats-py's `PullSubscription.fetch` starts a task and a timer for every message it returns; for a
set of hundreds of tiny datums that is most of the worker's time, and for a committer taking
results by the hundred, a good part of its own. Here a fetch is one request and
one drain of the inbox:

1. `{"batch": n, "no_wait": true}`: whatever is there now, up to n, closed by a 404 status;
2. if nothing was there, `{"batch": 1, "expires": wait}`: wait for the next datum, and only one,
   so that no datum is delivered to a worker busy with something else; then top up as in 1.
   A consumer whose last fetch found nothing even after waiting starts here: an idle worker
   sends one request per wait, not two.

A consumer that takes whatever comes, whenever (the committer, with `linger`), keeps one request
`{"batch": n, "expires": wait}` open instead: each fetch returns what came, once `linger` has
passed since the first, and leaves the request open for the next one. Results trickling in one by
one then cost the broker one request a second, not a round of three requests each.

Each request has a reply subject of its own under the inbox (`<inbox>.<n>`), and the broker
sends its messages and its closing status there: a status ends only the request it names. The
408 of a request that expired while no fetch was waiting on it often comes just after; taken
for the end of the request open now, it had that one sent again at once. A count of the
statuses still due could not tell them apart either once one was lost with a connection.

A message that comes after we stopped waiting for it (its request expired as it was sent) stays in
the inbox and is the first one the next fetch returns: delivered to us, it is ours to handle.
There is no subscription state to lose when the broker restarts: the inbox is resubscribed on
reconnect, and a request lost with the old connection just times out (nats.py #504).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from datumflow.broker import subjects
from datumflow.broker.connection import TRANSIENT, Broker

log = logging.getLogger(__name__)

_NO_MESSAGES = "404"
_TIMEOUT = "408"
_CONFLICT = "409"
_CONTROL = "100"
_ANSWER = 5.0
"""Seconds a request for the messages there now waits for its answer (a 404 when none are)."""


class _Request(msgspec.Struct, omit_defaults=True):
    batch: int
    no_wait: bool = False
    expires: int = 0
    """Nanoseconds."""


_encode = msgspec.json.Encoder().encode


class Puller:
    """Batches of messages from one durable consumer."""

    def __init__(self, broker: Broker, *, stream: str, durable: str) -> None:
        self.broker = broker
        self.subject = f"{subjects.JS_API}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.durable = durable
        self._inbox = ""
        self._sub: Subscription | None = None
        self._box: deque[Msg] = deque()
        self._waiters: set[asyncio.Future[None]] = set()
        """Resolved when a message or status comes (`_arrival` waits on one)."""
        self._open_until = 0.0
        """When the open request (linger) expires, on the loop's clock; 0: none is open."""
        self._open_left = 0
        """How many more messages the open request may bring."""
        self._sent = 0
        """Requests sent: the last one's reply subject is `<inbox>.<_sent>`."""
        self._open_reply = ""
        """The reply subject of the open request (linger)."""
        self._empty = False
        """The last fetch found nothing, even after waiting: the next one waits at once."""

    async def _receive(self, msg: Msg) -> None:
        self._box.append(msg)
        for waiter in self._waiters:
            _wake(waiter)

    async def _subscribe(self) -> None:
        if self._sub is None:
            self._inbox = self.broker.nc.new_inbox()
            self._sub = await self.broker.nc.subscribe(f"{self._inbox}.*", cb=self._receive)

    async def _request(self, request: _Request) -> str:
        """Send one pull request; its reply subject, where its messages and status come."""
        self._sent += 1
        reply = f"{self._inbox}.{self._sent}"
        await self.broker.nc.publish(self.subject, _encode(request), reply=reply)
        return reply

    async def fetch(self, *, batch: int = 1, wait: float = 1.0, linger: float = 0.0) -> list[Msg]:
        """Up to `batch` messages (a few more if some were left over); [] when none came within
        `wait` seconds (`wait=0`: only those there now, one request). With `linger`, once there
        is one, wait up to that long for the batch to fill: fewer, larger batches for a consumer
        that can take the delay (the committer)."""
        try:
            await self._subscribe()
            if linger > 0 and wait > 0:
                return await self._open(batch=batch, wait=wait, linger=linger)
            msgs = self._leftovers()
            if msgs:
                self._empty = False
                return msgs
            if not (self._empty and wait > 0):
                # An idle consumer skips this: asking for what is there now, when nothing was
                # a moment ago, only doubled the requests of a worker waiting for a job.
                msgs = await self._ask(_Request(batch=batch, no_wait=True), timeout=wait or _ANSWER)
                if msgs or wait <= 0:
                    self._empty = not msgs
                    return msgs
            msgs = await self._ask(_Request(batch=1, expires=int(wait * 1e9)), timeout=wait + 0.5)
            if msgs and len(msgs) < batch:
                rest = _Request(batch=batch - len(msgs), no_wait=True)
                msgs += await self._ask(rest, timeout=wait + 0.5)
            self._empty = not msgs
            return msgs
        except TRANSIENT as exc:
            log.warning("fetching from %s: %s", self.durable, exc)
            await asyncio.sleep(0.5)
            return []

    async def _open(self, *, batch: int, wait: float, linger: float) -> list[Msg]:
        """What the open request brings: up to `batch` messages, returned `linger` seconds after
        the first (or at once if the request ended); [] if none came within `wait`. A request is
        opened when none is."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._open_until <= now or self._open_left <= 0:
            request = _Request(batch=batch, expires=int(wait * 1e9))
            self._open_reply = await self._request(request)
            self._open_until, self._open_left = now + wait, batch
        # A status may be lost with a connection: past its expiry (and a margin) it is over.
        deadline = min(now + wait, self._open_until + 0.5)
        out: list[Msg] = []
        box = self._box
        while len(out) < batch:
            if not await self._arrival(deadline):
                break
            msg = box.popleft()
            status = _status(msg)
            ours = msg.subject == self._open_reply
            if not status:
                # Counted against the open request whichever request brought it: a message
                # carries the stream's subject, not the reply subject it was sent to, and a
                # request thought spent early is only replaced sooner.
                out.append(msg)  # an earlier request's message too: delivered to us, ours
                self._open_left -= 1
                if len(out) == 1:
                    deadline = min(deadline, loop.time() + linger)
            elif status != _CONTROL and ours:
                self._open_until = 0.0  # 404, 408, 409: the request is over
                if status == _CONFLICT:
                    await self._conflict(msg)
                if out:
                    break
                deadline = min(deadline, loop.time())  # ask again on the next fetch
        if self._open_until and loop.time() >= self._open_until + 0.5:
            self._open_until = 0.0  # its status was lost (with a connection): over
        return out

    async def _arrival(self, deadline: float) -> bool:
        """Until a message or status is in the box: False if `deadline` (loop time) comes first."""
        loop = asyncio.get_running_loop()
        while not self._box:
            if deadline <= loop.time():
                return False
            # A future and a timer, not wait_for's task around an Event: this runs for each
            # message that trickles in (a committer's results, a worker's next datum).
            waiter: asyncio.Future[None] = loop.create_future()
            timer = loop.call_at(deadline, _wake, waiter)
            self._waiters.add(waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiters.discard(waiter)
        return True

    async def _conflict(self, msg: Msg) -> None:
        # The consumer was deleted or is changing leader: do not spin on it.
        log.info("%s: %s", self.durable, (msg.headers or {}).get("Description", ""))
        await asyncio.sleep(0.5)

    def _leftovers(self) -> list[Msg]:
        out = [m for m in self._box if not _status(m)]
        self._box.clear()
        return out

    async def _ask(self, request: _Request, *, timeout: float) -> list[Msg]:
        """Send one pull request and collect its messages until its closing status."""
        reply = await self._request(request)
        box = self._box
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        out: list[Msg] = []
        while len(out) < request.batch:
            if not await self._arrival(deadline):
                break
            msg = box.popleft()
            status = _status(msg)
            if not status:
                out.append(msg)
            elif status == _CONTROL or msg.subject != reply:
                continue  # an earlier request's end (one we stopped waiting for): not this one's
            else:
                if status == _CONFLICT:
                    await self._conflict(msg)
                break  # 404 nothing (more) now, 408 expired, 409: this request is over
        return out

    async def close(self) -> None:
        if self._sub is None:
            return
        sub, self._sub = self._sub, None
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        # Delivered to us and never started: hand them back now rather than after ack_wait.
        for msg in self._leftovers():
            with contextlib.suppress(Exception):
                await msg.nak()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _status(msg: Msg) -> str:
    headers = msg.headers
    if not headers or msg.data:
        return ""
    return headers.get("Status", "")
