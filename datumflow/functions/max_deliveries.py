"""Datums whose worker died on every attempt: the server's max-deliveries advisory becomes a FAILED
result.

Owns reading the advisory, the datum it names (still in the datums stream: the server leaves it
there, work queue or not), the result that tells the job the datum was given up, and removing the
datum afterwards.
"""

from __future__ import annotations

import asyncio

import msgspec

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.consumer import Unusable, consume, decode
from datumflow.broker.messages import DatumResult, DatumTask
from datumflow.broker.set_parts import datums_of
from datumflow.broker.settle import Msg
from datumflow.broker.streams import delete_message, get_message
from datumflow.errors import PermanentError


class MaxDeliveries(msgspec.Struct):
    """The part of the server's max-deliveries advisory we use."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int = 0


async def watch_max_deliveries(*, broker: Broker, stop: asyncio.Event) -> None:
    """Give up, as FAILED, every datum the server reports out of deliveries, until `stop`."""

    async def handle(msg: Msg) -> None:
        await give_up_datum(broker=broker, msg=msg)

    await consume(
        broker,
        stream=subjects.ADVISORIES_STREAM,
        durable=subjects.ADVISORY_CONSUMER,
        function="committer",
        handle=handle,
        stop=stop,
    )


async def give_up_datum(*, broker: Broker, msg: Msg) -> None:
    """Publish the FAILED result of the datum a max-deliveries advisory names, then remove it."""
    try:
        advisory = msgspec.json.decode(msg.data, type=MaxDeliveries)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Unusable(f"max-deliveries advisory: {exc}") from None
    if advisory.stream != subjects.DATUMS_STREAM:
        return
    data = await get_message(
        broker,
        stream=subjects.DATUMS_STREAM,
        seq=advisory.stream_seq,
        what="reading a datum that ran out of deliveries",
    )
    if data is None:
        return  # a late worker finished it after all, or its job was killed
    try:
        task = decode(data, DatumTask, what="datum task")
    except PermanentError:
        await _forget_datum(broker=broker, seq=advisory.stream_seq)
        return
    # A set message (DatumTask.more) gives up each of its datums; those its workers reported
    # before dying are counted already, and the committer keeps a datum's first result.
    for one in datums_of(task):
        await broker.publish(
            subjects.result(one.pipeline, one.job),
            given_up(one, attempts=one.tries + advisory.deliveries),
            msg_id=f"{one.job}:{one.datum}:failed",
        )
    # The server leaves such a message in the stream, work queue or not; it is ours to remove.
    await _forget_datum(broker=broker, seq=advisory.stream_seq)


async def _forget_datum(*, broker: Broker, seq: int) -> None:
    await delete_message(
        broker,
        stream=subjects.DATUMS_STREAM,
        seq=seq,
        what="removing a datum that ran out of deliveries",
    )


def given_up(task: DatumTask, *, attempts: int) -> DatumResult:
    """The FAILED result of a datum whose worker died during each of its `attempts`."""
    return DatumResult(
        pipeline=task.pipeline,
        job=task.job,
        datum=task.datum,
        hash=task.hash,
        state="failed",
        files=[f for i in task.inputs for f in i.files],
        error=(
            f"the worker died during each of its {attempts} attempts"
            " (datum_tries): killed, out of memory, or crashed; the datum was given up"
        ),
        attempts=attempts,
    )
