"""Where bucket notifications wait for the ingest function: owns the DF_INGEST stream and its
consumers.

MinIO's NATS target publishes each notification on one subject, on core NATS or (with
`jetstream=on`) as a JetStream publish that needs a stream capturing the subject. DF_INGEST captures
`df.ingest.>` and every subject a bucket mapping names, so both ways land in it, and a notification
published while ingest is down waits there. A subject that another stream captures already (one an
operator made for MinIO) is not moved: ingest gets its own durable consumer on that stream instead.

Subjects are only ever added to DF_INGEST, never removed: two parties ensuring it at once (the CLI
recording a mapping, ingest starting) must not drop each other's subjects, or core NATS publishes
on the dropped one would be lost.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import NamedTuple

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NotFoundError

from datumflow.broker import subjects
from datumflow.broker.connection import Broker, broker_errors
from datumflow.broker.declare import ensure_stream

log = logging.getLogger(__name__)

INGEST_STREAM = subjects.INGEST_STREAM
DEFAULT_SUBJECT = subjects.INGEST_DEFAULT
INGEST_DURABLE = subjects.INGEST_CONSUMER
ACK_WAIT = 30.0
MAX_ACK_PENDING = 20_000
WEEK = 7 * 24 * 3600.0


class Binding(NamedTuple):
    """A durable consumer ingest reads notifications from."""

    stream: str
    durable: str
    subjects: tuple[str, ...]


def _stream_config(subject_list: list[str]) -> StreamConfig:
    return StreamConfig(
        name=INGEST_STREAM,
        subjects=subject_list,
        # A work queue: a notification is gone once its change is committed and it is acked.
        retention=RetentionPolicy.WORK_QUEUE,
        # Notifications nobody ingested for a week are dropped rather than kept forever.
        max_age=WEEK,
        storage=StorageType.FILE,
    )


def _consumer_config(filters: list[str] | None = None) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=INGEST_DURABLE,
        filter_subjects=filters or None,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT,
        # A whole batch is held unacknowledged until its commit is made.
        max_ack_pending=MAX_ACK_PENDING,
        max_deliver=-1,
        deliver_policy=DeliverPolicy.ALL,
    )


async def _owner(broker: Broker, subject: str) -> str:
    """The stream capturing `subject` (or one overlapping it), "" if none does."""
    try:
        return await broker.js.find_stream_name_by_subject(subject)
    except NotFoundError:
        return ""


async def ensure_ingest_stream(broker: Broker, wanted: Iterable[str] = ()) -> list[Binding]:
    """Make sure every subject in `wanted` (and the default one) is captured, and a durable ingest
    consumer reads it; return those consumers."""
    wanted_set = {DEFAULT_SUBJECT, *wanted}
    async with broker_errors("declaring the ingest stream"):
        try:
            info = await broker.js.stream_info(INGEST_STREAM)
            ours = list(info.config.subjects or [])
            replicas = info.config.num_replicas or 1
        except NotFoundError:
            ours, replicas = [], 0
        foreign: dict[str, list[str]] = {}
        added = False
        for subject in sorted(wanted_set):
            owner = await _owner(broker, subject)
            if owner == INGEST_STREAM or subject in ours:
                continue
            if owner:
                foreign.setdefault(owner, []).append(subject)
                continue
            ours.append(subject)
            added = True
        if added or not ours or replicas < broker.replicas:
            config = _stream_config(sorted(set(ours)))
            await ensure_stream(broker, config, replicas=broker.replicas)
        await broker.js.add_consumer(INGEST_STREAM, _consumer_config())
        bindings = [Binding(INGEST_STREAM, INGEST_DURABLE, tuple(sorted(ours)))]
        for stream, filters in sorted(foreign.items()):
            binding = await _bind_foreign(broker, stream, filters)
            if binding is not None:
                bindings.append(binding)
    return bindings


async def _bind_foreign(broker: Broker, stream: str, filters: list[str]) -> Binding | None:
    """Our durable on a stream someone else declared, filtered to the subjects we need from it."""
    try:
        existing = await broker.js.consumer_info(stream, INGEST_DURABLE)
        config = existing.config
        have = list(
            config.filter_subjects or ([config.filter_subject] if config.filter_subject else [])
        )
    except NotFoundError:
        have = []
    merged = sorted(set(have) | set(filters))
    try:
        await broker.js.add_consumer(stream, _consumer_config(merged))
    except APIError as exc:
        log.error(
            "ingest: notifications on %s are captured by stream %s, and a consumer for them cannot"
            " be made there (%s); give the mapping a subject that stream does not capture, or"
            " remove it from that stream",
            ", ".join(filters),
            stream,
            exc.description or exc,
        )
        return None
    return Binding(stream, INGEST_DURABLE, tuple(merged))
