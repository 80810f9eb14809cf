"""Streams, consumers and KV buckets, declared once and ensured idempotently by every function.

Declaring an existing stream or bucket with the same config is a no-op on the server, so each
function calls `ensure_topology` at start and never depends on who came first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError

from datumflow.broker import subjects
from datumflow.broker.connection import TRANSIENT, Broker, broker_errors
from datumflow.broker.nats_errors import NOT_NOW
from datumflow.errors import BrokerError, TopologyRefused
from datumflow.spec import PipelineSpec, input_leaves

log = logging.getLogger(__name__)

DAY = 24 * 3600.0
LEADER_PATIENCE = 30.0
"""Seconds a replicated stream just created or upgraded may take to elect its first leader, and
that declaring one waits for a cluster still gathering its servers."""
# The planner and committer heartbeat or finish well inside this; a crashed one's message comes
# back to its restarted self after at most this long.
CONTROL_ACK_WAIT = 10.0
DUPLICATE_WINDOW = 120.0
LEASE_TTL = 4.0
"""Seconds a lease outlives its last renewal (the `df_leases` bucket's max age): a standby takes
over this long after the active replica died at most, plus its polling interval."""
MAX_PAYLOAD = 8 * 1024 * 1024

STREAMS = [
    StreamConfig(
        name=subjects.COMMITS_STREAM,
        subjects=[subjects.COMMITS_ALL, subjects.RERUNS_ALL],
        retention=RetentionPolicy.LIMITS,
        max_age=30 * DAY,
        duplicate_window=DUPLICATE_WINDOW,
        storage=StorageType.FILE,
    ),
    StreamConfig(
        name=subjects.DATUMS_STREAM,
        subjects=[subjects.DATUMS_ALL],
        # A work queue: a datum message is gone once a worker acks it.
        retention=RetentionPolicy.WORK_QUEUE,
        duplicate_window=DUPLICATE_WINDOW,
        storage=StorageType.FILE,
    ),
    StreamConfig(
        name=subjects.RESULTS_STREAM,
        subjects=[subjects.RESULTS_ALL, subjects.JOBS_ALL],
        retention=RetentionPolicy.LIMITS,
        # Kept so a restarted committer can replay the results of unfinished jobs.
        max_age=7 * DAY,
        duplicate_window=DUPLICATE_WINDOW,
        storage=StorageType.FILE,
    ),
    StreamConfig(
        name=subjects.DEAD_STREAM,
        subjects=[subjects.DEAD_ALL],
        retention=RetentionPolicy.LIMITS,
        max_age=30 * DAY,
        storage=StorageType.FILE,
    ),
    StreamConfig(
        name=subjects.ADVISORIES_STREAM,
        # The server publishes these on core NATS once; a stream keeps them for a committer that
        # happens to be restarting at that moment.
        subjects=[subjects.max_deliveries_advisory()],
        retention=RetentionPolicy.WORK_QUEUE,
        max_age=7 * DAY,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
    ),
]

BUCKETS = [
    KeyValueConfig(bucket=subjects.REPOS_BUCKET, history=1, storage=StorageType.FILE),
    KeyValueConfig(bucket=subjects.BRANCHES_BUCKET, history=1, storage=StorageType.FILE),
    KeyValueConfig(bucket=subjects.COMMITS_BUCKET, history=1, storage=StorageType.FILE),
    KeyValueConfig(bucket=subjects.PIPELINES_BUCKET, history=5, storage=StorageType.FILE),
    KeyValueConfig(bucket=subjects.JOBS_BUCKET, history=1, storage=StorageType.FILE),
    KeyValueConfig(bucket=subjects.JOB_HEADS_BUCKET, history=1, storage=StorageType.FILE),
    KeyValueConfig(
        bucket=subjects.LEASES_BUCKET, history=1, ttl=LEASE_TTL, storage=StorageType.FILE
    ),
]

# Declared by whoever records or reads a bucket feed first, not with the rest.
MAPPINGS = KeyValueConfig(bucket=subjects.MAPPINGS_BUCKET, history=1, storage=StorageType.FILE)

SHARED_CONSUMERS = [
    (
        subjects.RESULTS_STREAM,
        ConsumerConfig(
            durable_name=subjects.COMMITTER_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=CONTROL_ACK_WAIT,
            max_ack_pending=20_000,
            deliver_policy=DeliverPolicy.ALL,
        ),
    ),
    (
        subjects.ADVISORIES_STREAM,
        ConsumerConfig(
            durable_name=subjects.ADVISORY_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=CONTROL_ACK_WAIT,
            deliver_policy=DeliverPolicy.ALL,
        ),
    ),
    (
        subjects.COMMITS_STREAM,
        ConsumerConfig(
            durable_name=subjects.COMMITS_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=CONTROL_ACK_WAIT,
            max_ack_pending=64,
            deliver_policy=DeliverPolicy.NEW,
        ),
    ),
]


async def ensure_topology(
    broker: Broker, *, replicas: int | None = None, patience: float = LEADER_PATIENCE
) -> None:
    """Create or update every stream, bucket and shared consumer, each kept on `replicas` servers
    (the broker's setting, DATUMFLOW_REPLICAS, unless given); waiting up to `patience` seconds
    for the cluster to answer, or to have the servers to place them on."""
    replicas = broker.replicas if replicas is None else replicas
    async with broker_errors("declaring streams and buckets"):
        await refuse_unkeepable(broker, replicas=replicas)
        for config in STREAMS:
            await ensure_stream(broker, config, replicas=replicas, patience=patience)
        for bucket in BUCKETS:
            await ensure_bucket(broker, bucket, replicas=replicas, patience=patience)
        for stream, consumer in SHARED_CONSUMERS:
            # A durable consumer left at 0 replicas takes its stream's, and the server scales it
            # with the stream when that is upgraded: one setting for both.
            await _patiently(
                f"declaring consumer {consumer.durable_name}",
                functools.partial(broker.js.add_consumer, stream, consumer),
                patience=patience,
            )


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
                raise  # the cluster cannot place it yet: waited for by _patiently
            # Same name, different config (an older datumflow, fewer replicas): bring it up to date.
            await broker.js.update_stream(config)

    try:
        await _patiently(f"declaring stream {name}", declare, patience=patience)
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
            await _patiently(
                f"declaring bucket {config.bucket}",
                lambda: broker.js.create_key_value(bucket),
                patience=patience,
            )
        else:
            upgraded = dataclasses.replace(info.config, num_replicas=replicas)
            await _patiently(
                f"declaring bucket {config.bucket}",
                lambda: broker.js.update_stream(upgraded),
                patience=patience,
            )
    except APIError as exc:
        raise _refused(stream, have=have, replicas=replicas, exc=exc) from exc
    if replicas > 1:
        await stream_info(broker, stream, leader=True)


async def _patiently(
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


async def ensure_mappings_bucket(broker: Broker) -> None:
    """The bucket of bucket → repo mappings (datumflow.pfs.bucket_sources)."""
    async with broker_errors(f"declaring KV bucket {MAPPINGS.bucket}"):
        await ensure_bucket(broker, MAPPINGS, replicas=broker.replicas)


def worker_consumer_config(spec: PipelineSpec, *, ack_wait: float) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.worker_consumer(spec.name),
        filter_subject=subjects.datum(spec.name),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        # The server stops delivering after datum_tries attempts and raises the max-deliveries
        # advisory; the committer turns that into a FAILED datum.
        max_deliver=spec.datum_tries,
        max_ack_pending=10_000,
        deliver_policy=DeliverPolicy.ALL,
    )


def planner_consumer_config(spec: PipelineSpec) -> ConsumerConfig:
    repos = sorted({leaf.repo for leaf in input_leaves(spec.input)})
    return ConsumerConfig(
        durable_name=subjects.planner_consumer(spec.name),
        # Its commit events, and the requests to rerun one of its jobs: planned in turn.
        filter_subjects=[subjects.commit(repo) for repo in repos] + [subjects.rerun(spec.name)],
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=CONTROL_ACK_WAIT,
        # One commit event at a time: a pipeline's jobs are planned, and so committed, in order.
        max_ack_pending=1,
        max_deliver=-1,
        # A new pipeline starts from the current head of each input repo.
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
    )


async def ensure_pipeline_consumers(
    broker: Broker, spec: PipelineSpec, *, ack_wait: float, replan: bool = False
) -> None:
    """The pipeline's consumers must exist before KEDA reads its lag or a worker binds to it.

    With `replan`, the planner consumer starts over from the last commit of each input repo, so
    an updated pipeline runs a job of its new version on the current heads."""
    async with broker_errors(f"declaring the consumers of pipeline {spec.name}"):
        await broker.js.add_consumer(
            subjects.DATUMS_STREAM, worker_consumer_config(spec, ack_wait=ack_wait)
        )
        if replan:
            try:
                await broker.js.delete_consumer(
                    subjects.COMMITS_STREAM, subjects.planner_consumer(spec.name)
                )
            except NotFoundError:
                pass
        try:
            await broker.js.add_consumer(subjects.COMMITS_STREAM, planner_consumer_config(spec))
        except BadRequestError:
            # The input repos changed on update: filter subjects of a durable cannot always be
            # edited in place, and the planner consumer holds no state worth keeping.
            await broker.js.delete_consumer(
                subjects.COMMITS_STREAM, subjects.planner_consumer(spec.name)
            )
            await broker.js.add_consumer(subjects.COMMITS_STREAM, planner_consumer_config(spec))


async def ensure_rerun_subject(broker: Broker, spec: PipelineSpec) -> None:
    """The pipeline's planner consumer reads its rerun requests: one made by an older datumflow
    is brought up to date in place (the server keeps its position)."""
    async with broker_errors(f"declaring the planner consumer of pipeline {spec.name}"):
        try:
            await broker.js.add_consumer(subjects.COMMITS_STREAM, planner_consumer_config(spec))
        except BadRequestError as exc:
            raise TopologyRefused(
                f"the planner consumer of pipeline {spec.name} cannot take rerun requests"
                f" ({exc.description}): update the pipeline once (`datumflow update pipeline -f"
                " SPEC`), then rerun"
            ) from exc


async def delete_pipeline_consumers(broker: Broker, name: str) -> None:
    async with broker_errors(f"deleting the consumers of pipeline {name}"):
        for stream, consumer in (
            (subjects.DATUMS_STREAM, subjects.worker_consumer(name)),
            (subjects.COMMITS_STREAM, subjects.planner_consumer(name)),
        ):
            try:
                await broker.js.delete_consumer(stream, consumer)
            except Exception:
                pass
        await broker.js.purge_stream(subjects.DATUMS_STREAM, subject=subjects.datum(name))
