"""Reading and removing stream messages outside of a durable consumer: one message by sequence, the
messages of a few subjects as they are now, a consumer's backlog, and purging a subject.

Every call wraps the broker's failures into BrokerError, naming what it was doing.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from datumflow.broker.connection import Broker, broker_errors
from datumflow.broker.settle import Msg

FETCH = 1024
"""Messages asked for at once when reading subjects."""


async def get_message(broker: Broker, *, stream: str, seq: int, what: str) -> bytes | None:
    """The payload of message `seq` of `stream`; None if it is not there (any more)."""
    async with broker_errors(what):
        try:
            raw = await broker.js.get_msg(stream, seq)
        except NotFoundError:
            return None
    return raw.data or b""


async def delete_message(broker: Broker, *, stream: str, seq: int, what: str) -> None:
    """Remove message `seq` of `stream`; nothing if it is gone already."""
    async with broker_errors(what):
        try:
            await broker.js.delete_msg(stream, seq)
        except NotFoundError:
            pass


async def purge_subject(
    broker: Broker, *, stream: str, subject: str, what: str, below: int | None = None
) -> None:
    """Remove every message of `subject` from `stream`, or only those before sequence `below`."""
    async with broker_errors(what):
        await broker.js.purge_stream(stream, subject=subject, seq=below)


async def last_sequence(broker: Broker, *, stream: str, what: str) -> int:
    """The sequence of the last message stored in `stream` so far (0 if none ever was)."""
    async with broker_errors(what):
        info = await broker.js.stream_info(stream)
    return info.state.last_seq


async def pending(broker: Broker, *, stream: str, durable: str) -> int:
    """How many messages wait for the durable consumer `durable` (not yet delivered)."""
    async with broker_errors(f"reading the backlog of consumer {durable}"):
        info = await broker.js.consumer_info(stream, durable)
    return info.num_pending or 0


async def read_subjects(
    broker: Broker, *, stream: str, filters: list[str], what: str
) -> AsyncGenerator[list[Msg], None]:
    """The messages of `filters` in `stream`, in stream order, as far as they go now, a batch at a
    time (a job's results can be many: they are not all held at once).

    An ephemeral, unacknowledged consumer reads them without touching any durable consumer; it is
    deleted afterwards (and would expire on its own). Messages that arrive meanwhile are not
    waited for.
    """
    config = ConsumerConfig(
        filter_subjects=filters,
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        inactive_threshold=60,
        mem_storage=True,
    )
    async with broker_errors(what):
        info = await broker.js.add_consumer(stream, config)
        try:
            sub = await broker.js.pull_subscribe_bind(consumer=info.name, stream=stream)
            try:
                remaining = info.num_pending or 0
                while remaining > 0:
                    msgs = await sub.fetch(batch=min(remaining, FETCH), timeout=5)
                    remaining -= len(msgs)
                    yield msgs
            finally:
                await sub.unsubscribe()
        finally:
            try:
                await broker.js.delete_consumer(stream, info.name)
            except Exception:
                pass  # it expires after inactive_threshold anyway
