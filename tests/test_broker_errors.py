"""The broker's refusals come out of datumflow.broker as datumflow errors that say what was being
done and what to do (datumflow.broker.nats_errors), against a real nats-server: a message too
large, a consumer that does not exist, a stream or an account that is full, a limit of consumers
reached, a subject the user may not publish to. A handler that meets a refusal has its message
dead-lettered, not handed back forever."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    StreamConfig,
)

from datumflow.broker import subjects
from datumflow.broker.connection import Broker, connect
from datumflow.broker.consumer import Handler, consume
from datumflow.broker.kv import Records
from datumflow.broker.lag import consumer_lag
from datumflow.broker.messages import DeadLetter
from datumflow.broker.nats_errors import FULL_DELAY, MISSING_DELAY, refusal
from datumflow.broker.records import JobHead
from datumflow.broker.settle import UNEXPECTED_DELAY, Msg
from datumflow.broker.streams import pending, read_subjects
from datumflow.errors import (
    BrokerError,
    BrokerForbidden,
    BrokerFull,
    BrokerNotFound,
    BrokerRefused,
    Conflict,
    NotFound,
    PermanentError,
    TemporaryError,
)
from datumflow.runtime.embedded import EmbeddedServer
from datumflow.settings import Settings
from tests.helpers import dead_letters_now, eventually

pytestmark = pytest.mark.asyncio

SMALL = "SMALL"
"""A stream taking messages of at most 100 bytes."""
SMALL_SUBJECT = "small.x"


async def _small_stream(broker: Broker) -> None:
    await broker.js.add_stream(StreamConfig(name=SMALL, subjects=["small.>"], max_msg_size=100))


async def test_a_message_over_the_brokers_max_payload_is_refused_naming_it(
    broker: Broker,
) -> None:
    limit = broker.nc.max_payload
    started = time.monotonic()
    with pytest.raises(BrokerRefused) as refused:
        await broker.publish(subjects.dead("too-big"), b"x" * (limit + 1), msg_id="big")
    message = str(refused.value)
    assert "df.dead.too-big" in message and f"max_payload of {limit} bytes" in message
    assert time.monotonic() - started < 1  # refused at once, not retried for the patience


async def test_a_message_over_a_streams_max_msg_size_is_refused_not_retried(
    broker: Broker,
) -> None:
    await _small_stream(broker)
    started = time.monotonic()
    with pytest.raises(BrokerRefused) as refused:
        await broker.publish(SMALL_SUBJECT, b"x" * 500, msg_id="big")
    assert time.monotonic() - started < 2
    assert refused.value.err_code == 10054 and refused.value.code == 400
    message = str(refused.value)
    assert f"publishing to {SMALL_SUBJECT}" in message and "max_msg_size" in message
    # A KV bucket is a stream too: a value over its limit is refused the same way.
    await broker.js.create_key_value(KeyValueConfig(bucket="tiny", max_value_size=100))
    records = Records(broker, bucket="tiny", type=JobHead)
    with pytest.raises(BrokerRefused, match=r"writing tiny/big: .*err_code 10054"):
        await records.put("big", JobHead(pipeline="p" * 500))


async def test_a_missing_consumer_is_not_found_and_says_which(broker: Broker) -> None:
    with pytest.raises(BrokerNotFound) as missing:
        await pending(broker, stream=subjects.DATUMS_STREAM, durable="df-worker-nope")
    message = str(missing.value)
    assert "consumer df-worker-nope" in message and "consumer not found" in message
    assert missing.value.err_code == 10014
    # Not a datumflow NotFound: a caller reading "no such record" must not take a missing
    # consumer or bucket for one.
    assert not isinstance(missing.value, NotFound)
    # Where a missing consumer has a meaning of its own, it keeps it: no lag.
    assert await consumer_lag(broker, stream=subjects.DATUMS_STREAM, consumer="nope") == 0
    with pytest.raises(BrokerNotFound, match="opening KV bucket no_such_bucket"):
        await Records(broker, bucket="no_such_bucket", type=JobHead).get("k")


async def test_a_full_stream_is_temporary_with_a_long_delay(broker: Broker) -> None:
    await broker.js.add_stream(
        StreamConfig(name="FULL", subjects=["full.>"], max_bytes=2000, discard=DiscardPolicy.NEW)
    )
    await broker.publish("full.a", b"x" * 1500, msg_id="first")
    with pytest.raises(BrokerFull) as full:
        await broker.publish("full.a", b"x" * 1500, msg_id="second")
    # Temporary: the message being handled waits in its stream until room is made.
    assert isinstance(full.value, TemporaryError) and full.value.delay == FULL_DELAY
    message = str(full.value)
    assert "publishing to full.a" in message and "maximum bytes exceeded" in message
    assert "free space" in message


@contextlib.asynccontextmanager
async def server_with(tmp_path: Path, config: str) -> AsyncIterator[EmbeddedServer]:
    """A nats-server of the test's own, with `config` added to its configuration."""
    server = EmbeddedServer(
        store_dir=tmp_path / "nats", log_file=tmp_path / "nats.log", extra_config=config
    )
    server.start()
    try:
        await server.wait_ready()
        yield server
    finally:
        server.stop()


ACCOUNT = (
    "accounts { A: { jetstream: { max_file: 4096, max_mem: 4096, max_consumers: 1 },"
    " users: [{user: u, password: p}] } }"
)


async def test_an_account_out_of_storage_or_consumers_is_full_not_refused(
    tmp_path: Path,
) -> None:
    async with server_with(tmp_path, ACCOUNT) as server:
        settings = Settings(nats_url=server.url, nats_user="u", nats_password="p")
        broker = await connect(settings=settings, name="t")
        try:
            await broker.js.add_stream(StreamConfig(name="S", subjects=["s.>"]))
            with pytest.raises(BrokerFull, match=r"publishing to s\.a: .*err_code 10002"):
                for n in range(4):  # 4096 bytes hold two of these
                    await broker.publish("s.a", b"x" * 1500, msg_id=str(n))
            await broker.js.add_consumer("S", ConsumerConfig(durable_name="only"))
            with pytest.raises(BrokerFull) as full:
                async for _ in read_subjects(broker, stream="S", filters=["s.>"], what="listing"):
                    pass
            assert "listing: " in str(full.value) and "max_consumers" in str(full.value)
        finally:
            await broker.close()


USERS = (
    "authorization { users: ["
    " {user: admin, password: a},"
    ' {user: limited, password: l, permissions: {publish: {deny: ["forbidden.>"]}}}'
    "] }"
)


async def test_a_subject_the_user_may_not_publish_to_is_a_permission_refusal(
    tmp_path: Path,
) -> None:
    async with server_with(tmp_path, USERS) as server:
        url = server.url
        admin = await connect(
            settings=Settings(nats_url=url, nats_user="admin", nats_password="a"), name="t"
        )
        limited = await connect(
            settings=Settings(nats_url=url, nats_user="limited", nats_password="l"), name="t"
        )
        try:
            await admin.js.add_stream(StreamConfig(name="F", subjects=["forbidden.>"]))
            # The server drops the publish and says why on the side; without that word the
            # publish would wait out its patience and blame an unanswering broker.
            started = time.monotonic()
            with pytest.raises(BrokerForbidden) as refused:
                await limited.publish("forbidden.x", b"{}", msg_id="x", patience=30)
            assert time.monotonic() - started < 15
            message = str(refused.value)
            assert "publishing to forbidden.x" in message
            assert "permissions violation" in message.lower() and "grant it" in message
            # Not dead-lettered: the message being handled waits for the permission to be granted.
            assert isinstance(refused.value, TemporaryError) and refused.value.delay == FULL_DELAY
        finally:
            await limited.close()
            await admin.close()


async def test_the_error_table_by_err_code() -> None:
    """The classes the codes land in, for those a single test server cannot be made to send."""
    what = "doing it"
    leaderless = refusal(what, code=500, err_code=10009, description="cannot handle request")
    assert type(leaderless) is BrokerError
    assert isinstance(refusal(what, code=503, err_code=10023, description="x"), BrokerFull)
    assert isinstance(refusal(what, code=500, err_code=10047, description="x"), BrokerFull)
    assert isinstance(refusal(what, code=400, err_code=10071, description="x"), Conflict)
    taken = refusal(what, code=400, err_code=10058, description="name already in use")
    assert isinstance(taken, BrokerRefused) and isinstance(taken, PermanentError)
    assert "doing it: the broker refused" in str(taken)
    # A clustered stream's "wrong last sequence" while another write of the key is in flight.
    assert isinstance(refusal(what, code=400, err_code=10164, description="x"), Conflict)
    # Status 400, but the cluster is re-forming: a server down, or one joining.
    for passing in (10005, 10202):
        assert type(refusal(what, code=400, err_code=passing, description="x")) is BrokerError
    # A stream not found may be one a server is still setting up: waited for, not dead-lettered.
    missing = refusal(what, code=404, err_code=10059, description="stream not found")
    assert isinstance(missing, BrokerNotFound) and isinstance(missing, TemporaryError)
    assert missing.delay == MISSING_DELAY
    # 10077 is a full stream only when it says so; a store closed under a leader change passes.
    full = refusal(what, code=503, err_code=10077, description="maximum bytes exceeded")
    assert isinstance(full, BrokerFull) and "free space" in str(full)
    closed = refusal(what, code=500, err_code=10077, description="stream store closed")
    assert type(closed) is BrokerError and closed.delay < FULL_DELAY


# -- a handler meeting a refusal -----------------------------------------------------------------

IN_STREAM = "HANDLER_IN"
IN_DURABLE = "handler-in"
FUNCTION = "refusal-test"


@pytest_asyncio.fixture
async def incoming(broker: Broker) -> AsyncIterator[None]:
    await broker.js.add_stream(StreamConfig(name=IN_STREAM, subjects=["in.>"]))
    await broker.js.add_consumer(
        IN_STREAM,
        ConsumerConfig(
            durable_name=IN_DURABLE,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            deliver_policy=DeliverPolicy.ALL,
            max_deliver=-1,  # as the planner's: nothing but the handler ends a message
        ),
    )
    yield


@contextlib.asynccontextmanager
async def consuming(broker: Broker, handle: Handler) -> AsyncIterator[None]:
    """`consume` running with `handle` on the incoming stream, stopped on the way out."""
    stop = asyncio.Event()
    run = asyncio.create_task(
        consume(
            broker,
            stream=IN_STREAM,
            durable=IN_DURABLE,
            function=FUNCTION,
            handle=handle,
            stop=stop,
        )
    )
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(run, 10)


async def _letters(broker: Broker) -> list[DeadLetter]:
    return await dead_letters_now(broker, FUNCTION)


async def test_a_handler_meeting_a_refusal_dead_letters_its_message(
    broker: Broker, incoming: None
) -> None:
    """Before the refusals were wrapped, the raw nats-py error was "unexpected": the message was
    handed back every 2 s, forever, on a consumer without max_deliver."""
    await _small_stream(broker)
    handled: list[int] = []

    async def handle(msg: Msg) -> None:
        handled.append(1)
        await broker.publish(SMALL_SUBJECT, msg.data * 100, msg_id="out")  # too large

    await broker.publish("in.a", b"event", msg_id="in-a")
    async with consuming(broker, handle):
        letters = await eventually(lambda: _letters(broker), timeout=20, what="a dead letter")
        assert [letter.subject for letter in letters] == ["in.a"]
        assert SMALL_SUBJECT in letters[0].reason and "err_code 10054" in letters[0].reason

        async def settled() -> bool:
            info = await broker.js.consumer_info(IN_STREAM, IN_DURABLE)
            return info.num_ack_pending == 0 and info.num_pending == 0

        await eventually(settled, timeout=10, what="the message terminated")
        # Terminated, not handed back: no second try comes within the unexpected error's delay.
        await asyncio.sleep(UNEXPECTED_DELAY + 1)  # a bounded window: nothing more happens
        assert len(handled) == 1
        info = await broker.js.consumer_info(IN_STREAM, IN_DURABLE)
        assert info.num_redelivered == 0


async def test_a_handler_meeting_a_missing_bucket_waits_for_it_not_dead_letters(
    broker: Broker, incoming: None
) -> None:
    """A bucket (or stream) the broker says it lacks may be one a clustered server is still
    setting up, or one `datumflow up` declares again: the message waits for it, and is handled
    once it is there. Dead-lettered, a commit event would never be planned."""
    tries: list[int] = []
    handled: list[str] = []

    async def handle(msg: Msg) -> None:
        tries.append(1)
        head = await Records(broker, bucket="late", type=JobHead).find("p")
        handled.append(head.last_job if head else "")

    await broker.publish("in.a", b"event", msg_id="in-a")
    async with consuming(broker, handle):
        await eventually(lambda: len(tries) >= 1, timeout=10, what="a first try")
        await broker.js.create_key_value(KeyValueConfig(bucket="late"))
        await Records(broker, bucket="late", type=JobHead).put(
            "p", JobHead(pipeline="p", last_job="j1")
        )

        async def done() -> bool:
            return handled == ["j1"]

        await eventually(done, timeout=MISSING_DELAY + 10, what="the message handled")
        assert await _letters(broker) == []
