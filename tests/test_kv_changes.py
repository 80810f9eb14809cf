"""Following a KV bucket by its writes (datumflow.broker.kv_changes): a listing is due at once
when the bucket is written, and not before `every` seconds when nothing happens, so an idle
broker is not asked for the pipelines several times a second."""

from __future__ import annotations

import asyncio
import time

import pytest

from datumflow.broker import kv_changes, subjects
from datumflow.broker.connection import Broker, connect
from datumflow.broker.kv_changes import Changes
from datumflow.runtime.embedded import EmbeddedServer
from datumflow.settings import Settings
from tests.helpers import eventually

pytestmark = pytest.mark.asyncio


async def test_a_write_makes_a_listing_due_and_quiet_does_not(broker: Broker) -> None:
    changes = Changes(broker, bucket=subjects.PIPELINES_BUCKET, every=60)
    await changes.start()
    try:
        assert changes.due(), "never listed: due"
        changes.reading()
        # A change seen within SETTLE before this read may not be in it; none came here. Wait
        # past SETTLE so that the read counts in any case.
        await asyncio.sleep(kv_changes.SETTLE)
        assert not changes.due(), "nothing written since the listing"

        kv = await broker.kv(subjects.PIPELINES_BUCKET)
        await kv.put("edges", b"{}")
        await eventually(changes.due, timeout=5, what="the write seen")

        changes.reading()
        # The write came just before this read: the stream may not have stored it yet, so the
        # next listing is due too, until one starts SETTLE after the write.
        assert changes.due()
        await asyncio.sleep(kv_changes.SETTLE)
        changes.reading()
        assert not changes.due()

        await kv.delete("edges")
        await eventually(changes.due, timeout=5, what="the delete seen")
    finally:
        await changes.close()


async def test_a_listing_is_due_every_so_often_and_after_a_failure(broker: Broker) -> None:
    changes = Changes(broker, bucket=subjects.PIPELINES_BUCKET, every=0.6)
    await changes.start()
    try:
        changes.reading()
        assert not changes.due()
        await eventually(changes.due, timeout=5, interval=0.05, what="due after `every`")
        changes.reading()
        changes.missed()
        assert changes.due(), "a failed listing is tried again at once"
    finally:
        await changes.close()


async def test_wait_returns_on_a_write_not_only_at_the_timeout(broker: Broker) -> None:
    changes = Changes(broker, bucket=subjects.PIPELINES_BUCKET, every=60)
    await changes.start()
    stop = asyncio.Event()
    try:
        changes.reading()
        kv = await broker.kv(subjects.PIPELINES_BUCKET)
        started = time.monotonic()
        waiting = asyncio.create_task(changes.wait(stop, 30))
        await kv.put("edges", b"{}")
        await asyncio.wait_for(waiting, 10)
        assert time.monotonic() - started < 10

        changes.reading()  # the write is listed: waiting again waits for the next one, or stop
        started = time.monotonic()
        waiting = asyncio.create_task(changes.wait(stop, 30))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        stop.set()
        await asyncio.wait_for(waiting, 10)
        assert time.monotonic() - started < 10
    finally:
        await changes.close()


async def test_a_subscription_refused_leaves_listings_due_every_so_often(
    nats_server: EmbeddedServer,
) -> None:
    closed = await connect(settings=Settings(nats_url=nats_server.url), name="closed")
    await closed.close()
    changes = Changes(closed, bucket=subjects.PIPELINES_BUCKET, every=60)
    await changes.start()  # logged: the planner's loop goes on, listing every `every`
    assert changes.due()
    await changes.close()


async def test_the_connection_coming_back_makes_a_listing_due(
    nats_server: EmbeddedServer, broker: Broker
) -> None:
    changes = Changes(broker, bucket=subjects.PIPELINES_BUCKET, every=60)
    await changes.start()
    try:
        changes.reading()
        await asyncio.sleep(kv_changes.SETTLE)
        assert not changes.due()
        # Writes made while it was down went unseen: the listing is due as it comes back, not
        # `every` seconds later.
        nats_server.kill()
        nats_server.start()
        await nats_server.wait_ready()
        await eventually(changes.due, timeout=10, interval=0.05, what="due after reconnecting")
    finally:
        await changes.close()
