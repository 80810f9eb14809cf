"""Declaring one stream or KV bucket, on a single nats-server or a cluster: with the replicas
asked for, upgrading one that has fewer in place, and patient with a cluster that is electing a
leader or still gathering its servers. datumflow.broker.topology says what to declare.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable

from nats.js.api import KeyValueConfig, StreamConfig, StreamInfo
from nats.js.errors import APIError, BadRequestError, NotFoundError

from datumflow.broker import subjects
from datumflow.broker.connection import TRANSIENT, Broker, broker_errors
from datumflow.broker.nats_errors import NOT_NOW
from datumflow.errors import BrokerError, TopologyRefused

log = logging.getLogger(__name__)

LEADER_PATIENCE = 30.0
"""Seconds a replicated stream just created or upgraded may take to elect its first leader, and
that declaring one waits for a cluster still gathering its servers."""

# Replicas: a stream or bucket is created with as many as asked, and an existing one with fewer
# is upgraded in place (the server copies it to the new peers while it keeps serving). One with
# more is left as it is: a function started without DATUMFLOW_REPLICAS must not shrink a cluster's
# streams back to one copy; shrinking is an operator's decision (`nats stream edit --replicas`).


async def refuse_unkeepable(broker: Broker, *, replicas: int) -> None:
    """Refuse, before anything is changed, replicas that a single nats-server cannot keep.

    A standalone server refuses to create a stream of more than one replica but accepts an update
    of an existing one to three, and then reports three while it keeps one copy: that would be an
    upgrade in name only."""
    if replicas <= 1:
        return
    # nats-py keeps the server's INFO only privately; "cluster" is there when it has routes.
    info: dict[str, object] = getattr(broker.nc, "_server_info", {}) or {}
    if not info.get("cluster"):
        raise TopologyRefused(
            f"DATUMFLOW_REPLICAS={replicas}, but the broker is a single nats-server, which keeps"
            " one copy of each stream: set DATUMFLOW_REPLICAS=1, or point DATUMFLOW_NATS_URL at"
            f" a cluster of at least {replicas} nats-servers with JetStream"
        )


async def stream_info(broker: Broker, stream: str, *, leader: bool = False) -> StreamInfo | None:
    """The stream's info, None if it does not exist; with `leader`, only once it has a leader.

    A replicated stream that someone has just created or upgraded has no leader for a moment:
    nobody answers about it, and a write to it draws "no responders". So this asks again, briefly
    each time, for up to LEADER_PATIENCE seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LEADER_PATIENCE
    while True:
        try:
            async with broker_errors(f"reading stream {stream}"):
                try:
                    info = await asyncio.wait_for(broker.js.stream_info(stream), 2.0)
                except NotFoundError:
                    return None
            if not leader or info.cluster is None or info.cluster.leader:
                return info
        except BrokerError:
            pass  # no answer, or "cannot handle request" (10009) while it has no leader
        if loop.time() > deadline:
            raise BrokerError(
                f"stream {stream} has had no leader for {LEADER_PATIENCE:.0f}s: check that a"
                " majority of the broker's servers are up"
            )
        await asyncio.sleep(0.1)


async def replicas_of(broker: Broker, stream: str) -> int:
    """How many replicas `stream` has now; 0 if it does not exist."""
    info = await stream_info(broker, stream)
    return 0 if info is None else info.config.num_replicas or 1


async def ensure_stream(
    broker: Broker, config: StreamConfig, *, replicas: int, patience: float = LEADER_PATIENCE
) -> None:
    """Declare `config` with at least `replicas` replicas, upgrading an existing stream in place."""
    name = config.name or ""
    have = await replicas_of(broker, name)
    config = dataclasses.replace(config, num_replicas=max(have, replicas))

    async def declare() -> None:
        try:
            await broker.js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code in NOT_NOW:
                raise  # the cluster cannot place it yet: waited for by patiently
            # Same name, different config (an older datumflow, fewer replicas): bring it up to date.
            await broker.js.update_stream(config)

    try:
        await patiently(f"declaring stream {name}", declare, patience=patience)
    except APIError as exc:
        if have >= replicas:
            raise  # not about replicas
        raise _refused(name, have=have, replicas=replicas, exc=exc) from exc
    if replicas > 1:
        await stream_info(broker, name, leader=True)


async def ensure_bucket(
    broker: Broker, config: KeyValueConfig, *, replicas: int, patience: float = LEADER_PATIENCE
) -> None:
    """Declare a KV bucket with at least `replicas` replicas, upgrading an existing one in place."""
    stream = subjects.kv_stream(config.bucket)
    info = await stream_info(broker, stream)
    have = 0 if info is None else info.config.num_replicas or 1
    if info is not None and have >= replicas:
        return
    try:
        if info is None:
            bucket = dataclasses.replace(config, replicas=replicas)
            await patiently(
                f"declaring bucket {config.bucket}",
                lambda: broker.js.create_key_value(bucket),
                patience=patience,
            )
        else:
            upgraded = dataclasses.replace(info.config, num_replicas=replicas)
            await patiently(
                f"declaring bucket {config.bucket}",
                lambda: broker.js.update_stream(upgraded),
                patience=patience,
            )
    except APIError as exc:
        raise _refused(stream, have=have, replicas=replicas, exc=exc) from exc
    if replicas > 1:
        await stream_info(broker, stream, leader=True)


async def patiently(
    what: str, call: Callable[[], Awaitable[object]], *, patience: float = LEADER_PATIENCE
) -> None:
    """Call `call` until the broker answers it, for up to `patience` seconds: JetStream
    answers "temporarily unavailable" while its servers re-form a cluster (a server back from a
    partition), nobody answers about a stream while it elects a leader, and a cluster that has
    just lost sight of a server (restarting, or not yet joined) answers "no suitable peers for
    placement" to a stream it could place once that server is back."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    delay = 0.1
    waiting = False
    while True:
        try:
            await call()
            return
        except TRANSIENT as exc:
            if loop.time() > deadline:
                raise BrokerError(
                    f"{what}: the broker did not answer for {patience:.0f}s"
                    f" ({type(exc).__name__}); check that a majority of its servers are up"
                ) from exc
        except APIError as exc:
            if exc.err_code not in NOT_NOW or loop.time() > deadline:
                raise  # a refusal, or no server came: the caller says what to do
            if not waiting:
                waiting = True
                log.warning(
                    "%s: the cluster cannot place it yet (%s); waiting up to %.0fs for its"
                    " servers to join",
                    what,
                    exc.description,
                    patience,
                )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


def _refused(stream: str, *, have: int, replicas: int, exc: APIError) -> TopologyRefused:
    why = exc.description or type(exc).__name__
    if have:
        return TopologyRefused(
            f"stream {stream} has {have} replica(s) and could not be upgraded to {replicas}"
            f" ({why}); streams declared before it may already have {replicas}. Bring up at least"
            f" {replicas} nats-servers with JetStream in the cluster and start again (the rest are"
            " upgraded then), or set DATUMFLOW_REPLICAS to what the cluster can keep"
        )
    return TopologyRefused(
        f"stream {stream} could not be created with {replicas} replica(s) ({why}): bring up at"
        f" least {replicas} nats-servers with JetStream in the cluster, or set DATUMFLOW_REPLICAS"
        " to what it can keep"
    )
