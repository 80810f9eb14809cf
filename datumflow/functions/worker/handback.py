"""Giving a datum back without counting it as an attempt of its user code.

The server counts every delivery of a datum, a nak included, and stops at the worker consumer's
`max_deliver` (datum_tries), which the committer turns into a FAILED datum
(functions.max_deliveries). A worker that gives back a datum its code did not run to an end (it
is stopping: the datums of its set not started, a set fetched ahead, the datum in hand past the
stop's grace) therefore does not nak it: it publishes the task again as a new message that
carries the attempts made so far (`DatumTask.tries`), then acks the one it held. The attempt a
delivery stands for is `tries + num_delivered` (`attempt_of`); a delivery past datum_tries means
the worker died during each of the attempts left, and `spent` fails it.

Published, then acked: a worker that dies between the two leaves the datum in the queue twice,
and the committer keeps the first terminal result of a datum. A datum that cannot be published
again (the broker in trouble) is nak'ed instead, and that delivery counts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgspec

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.consumer import decode
from datumflow.broker.messages import DatumResult, DatumTask
from datumflow.broker.settle import Msg, ack, delivered, nak
from datumflow.errors import PermanentError
from datumflow.functions.max_deliveries import given_up

log = logging.getLogger(__name__)

PATIENCE = 5.0
"""Seconds a stopping worker waits for the broker to store a datum given back."""


def attempt_of(msg: Msg, task: DatumTask) -> int:
    """Which attempt of the user code this delivery of `task` is (1 for the first)."""
    return task.tries + delivered(msg)


def spent(
    items: Sequence[tuple[Msg, DatumTask]], *, datum_tries: int
) -> tuple[list[tuple[Msg, DatumTask]], list[tuple[Msg, DatumResult]]]:
    """The deliveries to run, and the FAILED results of those past datum_tries."""
    run, failed = [], []
    for msg, task in items:
        attempt = attempt_of(msg, task)
        if attempt > max(datum_tries, 1):
            failed.append((msg, given_up(task, attempts=attempt - 1)))
        else:
            run.append((msg, task))
    return run, failed


async def hand_back(broker: Broker, msgs: Sequence[Msg]) -> None:
    """Give each datum back to be taken at once, as many attempts in as it came. Once the broker
    fails to store one, the rest are nak'ed without waiting on it for each."""
    for index, msg in enumerate(msgs):
        try:
            task = decode(msg.data, DatumTask, what="datum task")
        except PermanentError:
            await nak(msg)
            continue
        again = msgspec.structs.replace(task, tries=attempt_of(msg, task) - 1)
        seq = msg.metadata.sequence.stream
        try:
            await broker.publish(
                subjects.datum(task.pipeline),
                again,
                msg_id=f"{task.job}:{task.datum}:back:{seq}",
                patience=PATIENCE,
            )
        except Exception as exc:
            log.warning("%d datums not given back (%s); nak'ed instead", len(msgs) - index, exc)
            await nak(msgs[index:])
            return
        await ack(msg)
