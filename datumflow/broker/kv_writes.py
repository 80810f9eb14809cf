"""Following the records written under a prefix of a KV bucket, as their writers publish them.

A plain subscription to the keys' subjects: no consumer on the server, nothing sent while nothing
is written. No history and no guarantee: a write made while the connection is down is missed. It
is for a reader that only learns early what it would otherwise learn late
(functions.worker.ended_jobs); datumflow.broker.kv's `watch` is the one with guarantees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from datumflow.broker import subjects
from datumflow.broker.connection import Broker, broker_errors

R = TypeVar("R", bound=msgspec.Struct)


class Writes(Generic[R]):
    """Calls `on_record` with each record of `type` written under `prefix` in `bucket`, and
    `on_delete` (if given) with the key of each delete or purge; values that are not such a
    record are passed over."""

    def __init__(
        self,
        broker: Broker,
        *,
        bucket: str,
        prefix: str,
        type: type[R],
        on_record: Callable[[R], None],
        on_delete: Callable[[str], None] | None = None,
    ) -> None:
        self.broker = broker
        self.subject = subjects.kv_keys(bucket, prefix=prefix)
        self.head = subjects.kv_key_prefix(bucket)
        self.type = type
        self.on_record = on_record
        self.on_delete = on_delete
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Subscribe; raises a BrokerError (a refused subject included) if the broker will not."""
        if self._sub is None:
            async with broker_errors(f"following the writes to {self.subject}"):
                self._sub = await self.broker.nc.subscribe(self.subject, cb=self._seen)

    async def _seen(self, msg: Msg) -> None:
        if not msg.data:  # a delete or purge marker
            if self.on_delete is not None:
                self.on_delete(msg.subject[len(self.head) :])
            return
        try:
            record = msgspec.json.decode(msg.data, type=self.type)
        except msgspec.DecodeError:
            return
        self.on_record(record)

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
