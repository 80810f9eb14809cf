"""What an idle consumer asks of the broker (datumflow.broker.pull): one pull request per wait,
not two, while the next message still arrives as soon as it is published.

Each request wakes an idle nats-server; an idle worker asked twice a second (what is there now,
then wait for one), and the committer's open request was sent again at once whenever the 408
closing the last one came just after its fetch had stopped waiting."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.aio.msg import Msg

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.pull import Puller
from datumflow.broker.settle import ack
from datumflow.broker.topology import ensure_pipeline_consumers, ensure_topology
from datumflow.runtime.embedded import EmbeddedServer
from datumflow.spec import load_spec
from tests.helpers import eventually

pytestmark = pytest.mark.asyncio


async def _requests(broker: Broker, stream: str, durable: str) -> list[float]:
    """When each pull request to the consumer was sent: a plain subscription sees them too."""
    seen: list[float] = []

    async def count(msg: Msg) -> None:
        seen.append(time.monotonic())

    await broker.nc.subscribe(f"{subjects.JS_API}.CONSUMER.MSG.NEXT.{stream}.{durable}", cb=count)
    await broker.nc.flush()
    return seen


async def _worker_consumer(broker: Broker, name: str) -> str:
    spec = load_spec(
        f'{{"pipeline": {{"name": "{name}"}}, "input": {{"pfs": {{"repo": "in", "glob": "/*"}}}},'
        ' "transform": {"cmd": ["true"]}}'
    )
    await ensure_pipeline_consumers(broker, spec, ack_wait=30)
    return subjects.worker_consumer(name)


async def result_arrives(broker: Broker, puller: Puller, *, wait: float) -> float:
    """Seconds from a result's publish to the committer's fetches returning it (then acked)."""
    sent = time.monotonic()
    await broker.js.publish(subjects.result("p", "j"), b"{}", headers={"Nats-Msg-Id": "r"})
    msgs: list[Msg] = []
    while not msgs and time.monotonic() - sent < 10:
        msgs = await puller.fetch(batch=64, wait=wait, linger=0.05)
    arrived = time.monotonic() - sent
    assert len(msgs) == 1
    await ack(msgs)
    return arrived


async def test_an_idle_worker_sends_one_request_per_wait_and_gets_the_next_datums_at_once(
    broker: Broker,
) -> None:
    durable = await _worker_consumer(broker, "idle")
    requests = await _requests(broker, subjects.DATUMS_STREAM, durable)
    puller = Puller(broker, stream=subjects.DATUMS_STREAM, durable=durable)
    try:
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            assert await puller.fetch(batch=8, wait=0.25) == []
        elapsed = time.monotonic() - started
        await broker.nc.flush()
        # The first fetch asks what is there, then waits; every later one only waits.
        assert len(requests) <= elapsed / 0.25 + 2, f"{len(requests)} requests in {elapsed:.2f}s"

        # Datums published while the worker waits: the first wakes it at once, and the rest of
        # the set comes with it.
        async def publish_later() -> float:
            await asyncio.sleep(0.1)
            sent = time.monotonic()
            for i in range(3):
                await broker.js.publish(
                    subjects.datum("idle"), b"{}", headers={"Nats-Msg-Id": f"d{i}"}
                )
            return sent

        publishing = asyncio.create_task(publish_later())
        msgs: list[Msg] = []
        while not msgs:
            msgs = await puller.fetch(batch=8, wait=5.0)
        arrived = time.monotonic()
        sent = await publishing
        assert arrived - sent < 1.0, "the waiting request brings the datum as it is published"
        while len(msgs) < 3:
            msgs += await puller.fetch(batch=8, wait=0)
        assert len(msgs) == 3
        await ack(msgs)
    finally:
        await puller.close()


async def test_an_open_request_is_sent_once_per_wait_and_still_brings_the_next_message(
    broker: Broker,
) -> None:
    requests = await _requests(broker, subjects.RESULTS_STREAM, subjects.COMMITTER_CONSUMER)
    puller = Puller(broker, stream=subjects.RESULTS_STREAM, durable=subjects.COMMITTER_CONSUMER)
    try:
        started = time.monotonic()
        while time.monotonic() - started < 2.5:
            assert await puller.fetch(batch=64, wait=0.25, linger=0.05) == []
        elapsed = time.monotonic() - started
        await broker.nc.flush()
        # One request a wait; each 408 that came just after its fetch had stopped waiting used
        # to be taken for the end of the next request, which was sent again at once.
        assert len(requests) <= elapsed / 0.25 + 2, f"{len(requests)} requests in {elapsed:.2f}s"

        assert await result_arrives(broker, puller, wait=0.25) < 1.0
    finally:
        await puller.close()


async def test_a_status_lost_with_the_connection_does_not_hide_the_end_of_a_later_request(
    nats_server: EmbeddedServer, broker: Broker
) -> None:
    puller = Puller(broker, stream=subjects.RESULTS_STREAM, durable=subjects.COMMITTER_CONSUMER)
    try:
        # The broker restarts while a request is open: that request's 408 never comes.
        fetching = asyncio.create_task(puller.fetch(batch=64, wait=1.0, linger=0.05))
        await asyncio.sleep(0.2)
        nats_server.kill()
        nats_server.start()
        await nats_server.wait_ready()
        assert await fetching == []
        await eventually(lambda: broker.nc.is_connected, timeout=10, what="reconnected")
        for _ in range(3):
            assert await puller.fetch(batch=64, wait=1.0, linger=0.05) == []

        # The consumer goes away and comes back (a leader change ends a request the same way):
        # the 409 ends the open request at once, and the next request brings the next result.
        fetching = asyncio.create_task(puller.fetch(batch=64, wait=5.0, linger=0.05))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await broker.js.delete_consumer(subjects.RESULTS_STREAM, subjects.COMMITTER_CONSUMER)
        await ensure_topology(broker)
        assert await fetching == []
        assert time.monotonic() - started < 3.0, "the 409 taken for the lost 408"
        assert await result_arrives(broker, puller, wait=5.0) < 3.0
    finally:
        await puller.close()
