"""Reading a job's events back from the results stream: its datum results (one per message, or a
worker's several in one) and its "planned" event.

The results stream is the record of truth for a job in flight. The committer replays it when it
(re)starts counting a job, and `datumflow list datum` / `logs` read it to show the datums of any job
still in the stream's retention. Both go through `replay`, so both see the same thing, and both keep
the first terminal result of each datum (`first_results`), which is what the job's figures count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.consumer import Unusable, decode
from datumflow.broker.messages import DatumResult, DatumResults, JobPlanned
from datumflow.broker.settle import Msg
from datumflow.broker.streams import read_subjects

JobEvent = DatumResult | JobPlanned


def decode_events(msg: Msg) -> list[JobEvent]:
    """The events a message of the results stream holds: one, or a worker's several results;
    Unusable if it is not one of ours."""
    if subjects.is_job_planned(msg.subject):
        return [decode(msg.data, JobPlanned, what="job event")]
    if subjects.is_results(msg.subject):
        many = decode(msg.data, DatumResults, what="datum results")
        if any(r.pipeline != many.pipeline or r.job != many.job for r in many.results):
            raise Unusable(f"datum results on {msg.subject}: a result of another job among them")
        return list(many.results)
    return [decode(msg.data, DatumResult, what="datum result")]


async def replay(broker: Broker, pipeline: str, job: str) -> list[JobEvent]:
    """Every event of `pipeline@job` in the stream, in stream order.

    They are read without touching the committer's durable consumer (broker.streams.read_subjects).
    Only what was there when we started: a live job's later results are not waited for. Messages
    that do not decode are left out: they were dead-lettered when they first came through.
    """
    out: list[JobEvent] = []
    batches = read_subjects(
        broker,
        stream=subjects.RESULTS_STREAM,
        filters=[
            subjects.result(pipeline, job),
            subjects.results(pipeline, job),
            subjects.job_planned(pipeline, job),
        ],
        what=f"reading the results of {pipeline}@{job}",
    )
    # Closed on the way out, whatever happens: the reading consumer is deleted now, not later.
    async with contextlib.aclosing(batches):
        async for msgs in batches:
            for msg in msgs:
                try:
                    out.extend(decode_events(msg))
                except Unusable:
                    pass
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
