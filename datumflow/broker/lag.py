"""A consumer's lag read from JetStream itself: the figure KEDA reads from the monitoring endpoint
(num_pending + num_ack_pending), for a broker that exposes no monitoring endpoint."""

from __future__ import annotations

from typing import NamedTuple

import nats.js.errors

from datumflow.broker.connection import Broker, broker_errors


async def consumer_lag(broker: Broker, *, stream: str, consumer: str) -> int:
    """Messages of `stream` not yet acknowledged by the durable `consumer`: those it has not
    delivered and those delivered but unacknowledged. 0 for a consumer that does not exist (made
    a moment from now, or deleted): it has nothing for a worker. A broker that does not answer
    raises BrokerError."""
    async with broker_errors(f"reading consumer {consumer} of stream {stream}"):
        try:
            info = await broker.js.consumer_info(stream, consumer, timeout=2)
        except nats.js.errors.NotFoundError:
            return 0
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


class Backlog(NamedTuple):
    """A consumer's messages by where they are: not yet delivered, delivered and not yet
    acknowledged, and of those, delivered more than once."""

    pending: int
    ack_pending: int
    redelivered: int


async def consumer_backlog(broker: Broker, *, stream: str, consumer: str) -> Backlog:
    """The durable `consumer`'s backlog; all 0 for one that does not exist. A broker that does
    not answer raises BrokerError."""
    async with broker_errors(f"reading consumer {consumer} of stream {stream}"):
        try:
            info = await broker.js.consumer_info(stream, consumer, timeout=2)
        except nats.js.errors.NotFoundError:
            return Backlog(0, 0, 0)
    return Backlog(
        int(info.num_pending or 0),
        int(info.num_ack_pending or 0),
        int(info.num_redelivered or 0),
    )
