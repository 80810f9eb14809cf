"""Streams, consumers and KV buckets, declared once and ensured idempotently by every function.

Declaring an existing stream or bucket with the same config is a no-op on the server, so each
function calls `ensure_topology` at start and never depends on who came first.
"""

from __future__ import annotations

import functools

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from datumflow.broker import subjects
from datumflow.broker.connection import Broker, broker_errors
from datumflow.broker.declare import (
    LEADER_PATIENCE,
    ensure_bucket,
    ensure_stream,
    patiently,
    refuse_unkeepable,
)
from datumflow.errors import TopologyRefused
from datumflow.spec import PipelineSpec, input_leaves

DAY = 24 * 3600.0
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
            await patiently(
                f"declaring consumer {consumer.durable_name}",
                functools.partial(broker.js.add_consumer, stream, consumer),
                patience=patience,
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


async def ensure_pipeline_consumers(broker: Broker, spec: PipelineSpec, *, ack_wait: float) -> None:
    """The pipeline's consumers must exist before KEDA reads its lag or a worker binds to it."""
    await ensure_worker_consumer(broker, spec, ack_wait=ack_wait)
    async with broker_errors(f"declaring the planner consumer of pipeline {spec.name}"):
        try:
            await broker.js.add_consumer(subjects.COMMITS_STREAM, planner_consumer_config(spec))
        except BadRequestError:
            # The input repos changed on update: filter subjects of a durable cannot always be
            # edited in place, and the planner consumer holds no state worth keeping.
            await _new_planner_consumer(broker, spec)


async def ensure_worker_consumer(broker: Broker, spec: PipelineSpec, *, ack_wait: float) -> None:
    async with broker_errors(f"declaring the worker consumer of pipeline {spec.name}"):
        await broker.js.add_consumer(
            subjects.DATUMS_STREAM, worker_consumer_config(spec, ack_wait=ack_wait)
        )


async def replan(broker: Broker, spec: PipelineSpec) -> None:
    """The planner consumer starts over from the last commit of each input repo, so that an
    updated pipeline runs a job of its new version on the current heads.

    Call it once the new version is recorded: the planner plans an event with the version it
    reads then, and the old version would take the heads' events for its last jobs, planned
    already, and drop them."""
    async with broker_errors(f"declaring the planner consumer of pipeline {spec.name}"):
        await _new_planner_consumer(broker, spec)


async def _new_planner_consumer(broker: Broker, spec: PipelineSpec) -> None:
    try:
        await broker.js.delete_consumer(
            subjects.COMMITS_STREAM, subjects.planner_consumer(spec.name)
        )
    except NotFoundError:
        pass
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
