"""The delivery rule (datumflow.broker.settle), against a real nats-server: ack, nak with a delay,
dead-letter and terminate, the unexpected, cancellation, batches, and a broker that is gone while
settling."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from datumflow.broker import subjects
from datumflow.broker.connection import Broker, connect
from datumflow.broker.messages import DeadLetter
from datumflow.broker.pull import Puller
from datumflow.broker.settle import UNEXPECTED_DELAY, Msg, keep_alive, settle
from datumflow.errors import BrokerError, PermanentError, TemporaryError
from datumflow.runtime.embedded import EmbeddedServer
from datumflow.settings import Settings
from tests.helpers import dead_letters_now, eventually

pytestmark = pytest.mark.asyncio

STREAM = "SETTLE_TEST"
DURABLE = "settle-test"
FUNCTION = "settle-test"
ACK_WAIT = 30.0
"""Long: a message that comes back sooner came back because it was nak'ed, not forgotten."""


async def _consumer(broker: Broker, *, ack_wait: float = ACK_WAIT) -> Puller:
    await broker.js.add_stream(StreamConfig(name=STREAM, subjects=["settle.>"]))
    await broker.js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name=DURABLE,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            deliver_policy=DeliverPolicy.ALL,
        ),
    )
    return Puller(broker, stream=STREAM, durable=DURABLE)


@pytest_asyncio.fixture
async def puller(broker: Broker) -> AsyncIterator[Puller]:
    sub = await _consumer(broker)
    try:
        yield sub
    finally:
        await sub.close()


async def _publish(broker: Broker, count: int) -> None:
    for n in range(count):
        await broker.js.publish(f"settle.{n}", f"m{n}".encode(), headers={"Nats-Msg-Id": f"id-{n}"})


async def _take(sub: Puller, count: int, *, within: float = 10.0) -> list[Msg]:
    """`count` messages, waiting up to `within` seconds for them."""
    got: list[Msg] = []

    async def fetch() -> int:
        got.extend(await sub.fetch(batch=count - len(got), wait=1.0))
        return len(got)

    with contextlib.suppress(AssertionError):  # the assertion below says how many came
        await eventually(fetch, until=lambda n: n >= count, timeout=within, interval=0)
    assert len(got) == count, f"{len(got)} of {count} messages came within {within}s"
    return got


async def _ack_pending(broker: Broker) -> int:
    return (await broker.js.consumer_info(STREAM, DURABLE)).num_ack_pending


async def _none_pending(broker: Broker) -> bool:
    return await _ack_pending(broker) == 0


async def _letters(broker: Broker) -> list[DeadLetter]:
    return await dead_letters_now(broker, FUNCTION)


async def test_handled_messages_are_acked_one_or_a_batch(broker: Broker, puller: Puller) -> None:
    await _publish(broker, 4)
    msgs = await _take(puller, 4)
    await settle(broker, function=FUNCTION, msgs=msgs[0])
    await settle(broker, function=FUNCTION, msgs=msgs[1:])
    await settle(broker, function=FUNCTION, msgs=[])  # nothing to do is not an error
    # An ack is a publish without an answer: it is done once the server says nothing is pending.
    await eventually(lambda: _none_pending(broker), timeout=5, what="no message pending an ack")
    assert await puller.fetch(batch=4, wait=0.5) == []


async def test_a_temporary_error_naks_with_its_delay(broker: Broker, puller: Puller) -> None:
    await _publish(broker, 2)
    msgs = await _take(puller, 2)
    settled = time.monotonic()
    await settle(broker, function=FUNCTION, msgs=msgs, outcome=TemporaryError("busy", delay=2.0))
    # Not before its delay...
    assert await puller.fetch(batch=2, wait=1.0) == []
    back = await _take(puller, 2)
    waited = time.monotonic() - settled
    # ...and long before ack_wait: it came back because it was nak'ed.
    assert 1.5 <= waited < ACK_WAIT / 2, waited
    assert sorted(m.data for m in back) == [b"m0", b"m1"]
    assert [m.metadata.num_delivered for m in back] == [2, 2]
    await settle(broker, function=FUNCTION, msgs=back)


async def test_max_delay_caps_what_a_temporary_error_asks(broker: Broker, puller: Puller) -> None:
    await _publish(broker, 1)
    msgs = await _take(puller, 1)
    settled = time.monotonic()
    await settle(
        broker,
        function=FUNCTION,
        msgs=msgs,
        outcome=TemporaryError("later", delay=600.0),
        max_delay=0.5,
    )
    (back,) = await _take(puller, 1)
    assert time.monotonic() - settled < 10
    assert back.metadata.num_delivered == 2


async def test_cancelled_and_unexpected_outcomes_hand_messages_back(
    broker: Broker, puller: Puller
) -> None:
    await _publish(broker, 2)
    first, second = await _take(puller, 2)
    settled = time.monotonic()
    await settle(broker, function=FUNCTION, msgs=first, outcome=asyncio.CancelledError())
    (back,) = await _take(puller, 1, within=5)  # at once: another consumer may take it now
    assert back.data == first.data and back.metadata.num_delivered == 2
    assert time.monotonic() - settled < UNEXPECTED_DELAY

    settled = time.monotonic()
    await settle(broker, function=FUNCTION, msgs=second, outcome=ValueError("a bug"))
    (again,) = await _take(puller, 1)  # a bug does not drop the message: it comes back
    assert again.data == second.data and again.metadata.num_delivered == 2
    assert UNEXPECTED_DELAY * 0.7 <= time.monotonic() - settled < ACK_WAIT / 2
    await settle(broker, function=FUNCTION, msgs=[back, again])


async def test_a_permanent_error_dead_letters_and_terminates(
    broker: Broker, puller: Puller
) -> None:
    await _publish(broker, 3)
    msgs = await _take(puller, 3)
    await settle(broker, function=FUNCTION, msgs=msgs[:2], outcome=PermanentError("no use"))
    await settle(broker, function=FUNCTION, msgs=msgs[2])

    letters = sorted(await _letters(broker), key=lambda d: d.subject)
    assert [(d.function, d.subject, d.reason, d.data) for d in letters] == [
        (FUNCTION, "settle.0", "no use", "m0"),
        (FUNCTION, "settle.1", "no use", "m1"),
    ]
    assert letters[0].headers["Nats-Msg-Id"] == "id-0"
    # Settling them again (a redelivery raced) stores no second letter and raises nothing.
    await settle(broker, function=FUNCTION, msgs=msgs[:2], outcome=PermanentError("no use"))
    assert len(await _letters(broker)) == 2
    await eventually(
        lambda: _none_pending(broker), timeout=5, what="no message pending an ack"
    )  # terminated: never redelivered
    assert await puller.fetch(batch=3, wait=0.5) == []


async def test_a_gone_broker_while_settling_raises_nothing_and_redelivery_does_it(
    nats_server: EmbeddedServer, broker: Broker
) -> None:
    settings = Settings(nats_url=nats_server.url)
    short = 2.0
    sub = await _consumer(broker, ack_wait=short)
    await _publish(broker, 4)
    doomed = await connect(settings=settings, name="settle-doomed")
    taker = Puller(doomed, stream=STREAM, durable=DURABLE)
    msgs = await _take(taker, 4)
    await doomed.nc.close()

    # Every outcome, on a closed connection: logged, never raised.
    await settle(doomed, function=FUNCTION, msgs=msgs[0])
    await settle(doomed, function=FUNCTION, msgs=msgs[1], outcome=TemporaryError("x", delay=9))
    await settle(doomed, function=FUNCTION, msgs=msgs[2], outcome=PermanentError("bad"))
    await settle(doomed, function=FUNCTION, msgs=msgs[3], outcome=RuntimeError("bug"))
    await keep_alive(msgs)
    with pytest.raises(BrokerError):  # the letter itself is not swallowed when asked for alone
        await doomed.publish(
            subjects.dead(FUNCTION),
            DeadLetter(function=FUNCTION, subject="s", reason="r", data=""),
            msg_id="x",
        )

    # Nothing was settled, so everything comes back after ack_wait, the permanent one included:
    # it was not terminated without its letter.
    back = await _take(sub, 4, within=short * 5)
    assert sorted(m.data for m in back) == [b"m0", b"m1", b"m2", b"m3"]
    assert all(m.metadata.num_delivered == 2 for m in back)
    assert await _letters(broker) == []
    await settle(broker, function=FUNCTION, msgs=back)
    await sub.close()


async def test_keep_alive_holds_messages_past_ack_wait(broker: Broker) -> None:
    short = 2.0
    sub = await _consumer(broker, ack_wait=short)
    other = Puller(broker, stream=STREAM, durable=DURABLE)
    try:
        await _publish(broker, 2)
        msgs = await _take(sub, 2)
        deadline = time.monotonic() + short * 3
        while time.monotonic() < deadline:
            await keep_alive(msgs)
            # Nobody else gets them while they are kept alive.
            assert await other.fetch(batch=2, wait=short / 4) == []
        await settle(broker, function=FUNCTION, msgs=msgs)
    finally:
        await other.close()
        await sub.close()


async def test_fetching_only_what_is_there_does_not_wait(broker: Broker, puller: Puller) -> None:
    started = time.monotonic()
    assert await puller.fetch(batch=4, wait=0) == []
    assert time.monotonic() - started < 2.0  # answered by the broker's 404, not by a timeout
    await _publish(broker, 3)
    await eventually(lambda: puller.fetch(batch=4, wait=0), until=lambda m: len(m) == 3)


async def test_a_set_fetched_ahead_is_held_and_handed_back_at_once(broker: Broker) -> None:
    from datumflow.broker.set_parts import SetParts
    from datumflow.functions.worker.ahead import Ahead
    from datumflow.functions.worker.batch import Heartbeat

    short = 2.0
    sub = await _consumer(broker, ack_wait=short)
    heartbeat = Heartbeat(every=short / 4)
    stop = asyncio.Event()

    async def size() -> int:
        return 2

    parts = SetParts(broker, beat_every=short / 4)
    ahead = Ahead(broker=broker, puller=sub, heartbeat=heartbeat, size=size, parts=parts, stop=stop)
    try:
        ahead.start()
        assert await ahead.take() == []  # nothing waiting: nothing taken, nothing waited for
        await _publish(broker, 3)
        ahead.start()
        ahead.start()  # one set ahead at most
        await eventually(lambda: len(heartbeat), until=lambda n: n == 2, what="the set held")
        # Held past ack_wait: the heartbeat keeps the set fetched ahead ours.
        await asyncio.sleep(short * 1.5)
        [third] = await _take(sub, 1)
        assert await sub.fetch(batch=2, wait=short / 4) == []
        # Stopping hands them back at once, not after ack_wait: they are the next ones out.
        stop.set()
        await ahead.hand_back()
        assert len(heartbeat) == 0
        back = await _take(sub, 2, within=short / 2)
        assert all(m.metadata.num_delivered == 2 for m in back)
        ahead.start()  # stopping: nothing more is fetched ahead
        assert await ahead.take() == []
        await settle(broker, function=FUNCTION, msgs=[third, *back])
    finally:
        await heartbeat.close()
        await sub.close()


async def test_a_lingering_fetch_keeps_one_request_open(broker: Broker, puller: Puller) -> None:
    """Messages trickling in one by one (results to the committer) cost no request each; once
    the open request expires, the next fetch opens another and messages keep coming."""
    requests: list[bytes] = []

    async def seen(msg: Msg) -> None:
        requests.append(msg.data)

    spy = await broker.nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{DURABLE}", cb=seen)
    try:
        wait = 2.0
        taken: list[Msg] = []
        for n in range(3):
            await broker.js.publish(f"settle.{n}", b"m", headers={"Nats-Msg-Id": f"t{n}"})
            taken += await puller.fetch(batch=100, wait=wait, linger=0.02)
            assert len(taken) == n + 1
        await broker.nc.flush()
        assert len(requests) == 1
        # Nothing comes: the request expires, the fetch says so with [] ...
        started = time.monotonic()
        while time.monotonic() - started < wait * 2 and len(requests) < 2:
            assert await puller.fetch(batch=100, wait=wait, linger=0.02) == []
        # ... and the next one is answered on a new request.
        await broker.js.publish("settle.9", b"m", headers={"Nats-Msg-Id": "t9"})
        taken += await eventually(
            lambda: puller.fetch(batch=100, wait=wait, linger=0.02), until=lambda m: len(m) == 1
        )
        await broker.nc.flush()
        assert len(requests) >= 2
        await settle(broker, function=FUNCTION, msgs=taken)
    finally:
        await spy.unsubscribe()
