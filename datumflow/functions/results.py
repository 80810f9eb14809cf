"""Reading a job's events back from the results stream: its datum results (one per message, or a
worker's several in one) and its "planned" event.

The results stream is the record of truth for a job in flight. The committer replays it when it
(re)starts counting a job, and `datumflow list datum` / `logs` read it to show the datums of any job
still in the stream's retention. Both go through `replay`, so both see the same thing, and both keep
the first terminal result of each datum (`first_results`), which is what the job's figures count.
"""

from __future__ import annotations

from collections.abc import Iterable

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from datumflow.broker import subjects
from datumflow.broker.connection import Broker, broker_errors
from datumflow.broker.messages import DatumResult, DatumResults, JobPlanned
from datumflow.functions.consumer import Unusable, decode

JobEvent = DatumResult | JobPlanned
FETCH = 1024


def decode_events(msg: Msg) -> list[JobEvent]:
    """The events a message of the results stream holds: one, or a worker's several results;
    Unusable if it is not one of ours."""
    if msg.subject.startswith("df.job."):
        return [decode(msg.data, JobPlanned, what="job event")]
    if msg.subject.endswith(".set"):
        many = decode(msg.data, DatumResults, what="datum results")
        if any(r.pipeline != many.pipeline or r.job != many.job for r in many.results):
            raise Unusable(f"datum results on {msg.subject}: a result of another job among them")
        return list(many.results)
    return [decode(msg.data, DatumResult, what="datum result")]


async def replay(broker: Broker, pipeline: str, job: str) -> list[JobEvent]:
    """Every event of `pipeline@job` in the stream, in stream order.

    An ephemeral, unacknowledged consumer over the job's two subjects reads them without touching
    the committer's durable consumer; it is deleted afterwards (and would expire on its own).
    Messages that do not decode are left out: they were dead-lettered when they first came through.
    """
    config = ConsumerConfig(
        filter_subjects=[
            subjects.result(pipeline, job),
            subjects.results(pipeline, job),
            subjects.job_planned(pipeline, job),
        ],
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        inactive_threshold=60,
        mem_storage=True,
    )
    out: list[JobEvent] = []
    async with broker_errors(f"reading the results of {pipeline}@{job}"):
        info = await broker.js.add_consumer(subjects.RESULTS_STREAM, config)
        try:
            sub = await broker.js.pull_subscribe_bind(
                consumer=info.name, stream=subjects.RESULTS_STREAM
            )
            try:
                # Only what was there when we started: a live job's later results are not waited for.
                remaining = info.num_pending or 0
                while remaining > 0:
                    msgs = await sub.fetch(batch=min(remaining, FETCH), timeout=5)
                    remaining -= len(msgs)
                    for msg in msgs:
                        try:
                            out.extend(decode_events(msg))
                        except Unusable:
                            pass
            finally:
                await sub.unsubscribe()
        finally:
            try:
                await broker.js.delete_consumer(subjects.RESULTS_STREAM, info.name)
            except Exception:
                pass  # it expires after inactive_threshold anyway
    return out


def first_results(events: Iterable[JobEvent]) -> dict[str, DatumResult]:
    """The first terminal result of each datum, by datum id. Later ones (a redelivery that raced,
    a late worker after a max-deliveries failure) do not count, so figures stay exact."""
    out: dict[str, DatumResult] = {}
    for event in events:
        if isinstance(event, DatumResult):
            out.setdefault(event.datum, event)
    return out


def planned_total(events: Iterable[JobEvent]) -> int | None:
    """The job's datum count once the planner has queued them all; None before."""
    for event in events:
        if isinstance(event, JobPlanned):
            return event.data_total
    return None
