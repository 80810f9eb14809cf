"""Knowing when a KV bucket is worth listing again, without asking the broker on a timer.

Listing a bucket costs the broker a request per key and one more (datumflow.broker.kv), and the
supervisor and the planner followed the pipelines bucket by listing it several times a second
whether anything had changed or not: on an idle broker, most of its work. `Changes` listens
instead: a plain subscription to the bucket's subjects sees every write to it as the writer
publishes it (no consumer on the server, nothing sent while nothing changes), and says a listing
is `due` when one came, or when `every` seconds have passed since the last one. The connection
coming back counts as a change, for the writes made while it was down; a bucket changed without
a publish (a purge), or a write stored long after it was seen, is listed within `every`.

A write reaches the subscription as the stream receives it, perhaps just before the stream has
stored it, so a listing counts as covering a change only if it started at least SETTLE seconds
after it: a reader lists again until one has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from datumflow.broker import subjects
from datumflow.broker.connection import Broker, broker_errors
from datumflow.errors import DatumflowError

log = logging.getLogger(__name__)

SETTLE = 0.5
"""Seconds after a change seen at which a listing surely holds it (a replicated stream stores a
write once a majority of its servers have it)."""


class Changes:
    """When one reader should list `bucket` again."""

    def __init__(self, broker: Broker, *, bucket: str, every: float) -> None:
        self.broker = broker
        self.bucket = bucket
        self.every = every
        self._changed = asyncio.Event()
        self._last_change: float | None = None
        """When a write was last seen (monotonic); None: none since we started."""
        self._read_at: float | None = None
        """When the last listing started; None: none did, or it failed."""
        self._sub: Subscription | None = None
        self._reconnects = broker.nc.stats["reconnects"]
        """The connection's reconnections as of the last look: writes made while it was down
        were not seen, so a reconnection counts as a change."""

    async def start(self) -> None:
        """Listen to the bucket's writes. If the broker refuses the subscription, listings are
        only ever due every `every` seconds."""
        if self._sub is None:
            subject = subjects.kv_keys(self.bucket)
            try:
                async with broker_errors(f"following the writes to bucket {self.bucket}"):
                    self._sub = await self.broker.nc.subscribe(subject, cb=self._seen)
            except DatumflowError as exc:
                # Raised, it would end the planner's loop while its adopter runs on: no pipeline
                # planned, and no exit for `up` to restart.
                log.warning("%s; listing every %gs", exc, self.every)

    async def _seen(self, msg: Msg) -> None:
        self._last_change = time.monotonic()
        self._changed.set()

    def due(self) -> bool:
        """Whether the bucket may hold something the last listing did not."""
        reconnects = self.broker.nc.stats["reconnects"]
        if reconnects != self._reconnects:
            self._reconnects = reconnects
            self._last_change = time.monotonic()
        read = self._read_at
        if read is None or time.monotonic() - read >= self.every:
            return True
        return self._last_change is not None and self._last_change > read - SETTLE

    def reading(self) -> None:
        """A listing starts now."""
        self._read_at = time.monotonic()
        self._changed.clear()

    def missed(self) -> None:
        """The listing failed: the next one is due at once."""
        self._read_at = None

    async def wait(self, stop: asyncio.Event, timeout: float) -> None:
        """Until a change is seen, `stop` is set, or `timeout` seconds have passed."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self._changed, stop)]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
