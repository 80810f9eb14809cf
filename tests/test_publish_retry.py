"""Every JetStream publish datumflow makes waits out a broker that cannot store it for a while (a
server restarting, a stream electing a new leader) and is stored once however often it is sent.
Against a real nats-server stopped and restarted under a publish, and a real three-node cluster
whose stream leader is killed."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import msgspec
import pytest

from datumflow.broker import subjects
from datumflow.broker.connection import Broker, connect
from datumflow.broker.kv import Records
from datumflow.broker.outbox import Outbox
from datumflow.broker.topology import ensure_topology
from datumflow.errors import BrokerError, BrokerNotFound
from datumflow.runtime.embedded import EmbeddedServer
from datumflow.settings import Settings
from tests.helpers import eventually
from tests.natscluster import NatsCluster, stream_info

pytestmark = pytest.mark.asyncio
log = logging.getLogger(__name__)

SUBJECT = subjects.dead("publish-test")


async def stored(broker: Broker) -> int:
    return (await broker.js.stream_info(subjects.DEAD_STREAM)).state.messages


async def still_running(task: asyncio.Future[object], *, for_: float) -> bool:
    """Whether `task` is still waiting after `for_` seconds (it must not finish while the broker
    cannot store anything)."""
    done, _ = await asyncio.wait([task], timeout=for_)
    return not done


def restarted(server: EmbeddedServer, root: Path) -> EmbeddedServer:
    again = EmbeddedServer(
        store_dir=server.store_dir,
        port=server.port,
        monitor_port=server.monitor_port,
        log_file=root / "nats-server.log",
    )
    again.start()
    return again


async def test_a_publish_outlives_a_server_restart(tmp_path: Path) -> None:
    server = EmbeddedServer(store_dir=tmp_path / "nats", log_file=tmp_path / "nats-server.log")
    server.start()
    await server.wait_ready()
    broker = await connect(settings=Settings(nats_url=server.url), name="t")
    try:
        await ensure_topology(broker)
        server.stop()
        await eventually(
            lambda: asyncio.sleep(0, broker.nc.is_reconnecting), what="the client to notice"
        )
        publish = asyncio.ensure_future(broker.publish(SUBJECT, b"{}", msg_id="once"))
        assert await still_running(publish, for_=1.0)
        server = restarted(server, tmp_path)
        seq = await asyncio.wait_for(publish, 60)
        assert await stored(broker) == 1
        # Sent again (as when the answer was lost): the stream keeps the first one.
        assert await broker.publish(SUBJECT, b"{}", msg_id="once") == seq
        assert await stored(broker) == 1
    finally:
        await broker.close()
        server.stop()


async def test_a_publish_gives_up_saying_why(tmp_path: Path) -> None:
    server = EmbeddedServer(store_dir=tmp_path / "nats", log_file=tmp_path / "nats-server.log")
    server.start()
    await server.wait_ready()
    broker = await connect(settings=Settings(nats_url=server.url), name="t")
    try:
        await ensure_topology(broker)
        # No stream captures the subject: the server answers "no responders", as it does for a
        # stream without a leader, but no wait can mend this one.
        started = time.monotonic()
        with pytest.raises(
            BrokerNotFound, match=r"nowhere\.at\.all: no stream captures this subject"
        ):
            await broker.publish("nowhere.at.all", b"{}", msg_id="x")
        assert time.monotonic() - started < 5
        # No broker for longer than the publish's patience.
        server.stop()
        with pytest.raises(BrokerError, match=r"did not answer \d+ tries in 1s.*majority"):
            await broker.publish(SUBJECT, b"{}", msg_id="y", patience=1.0)
    finally:
        await broker.close()
        server.stop()


async def test_an_outbox_outlives_a_server_restart(tmp_path: Path) -> None:
    server = EmbeddedServer(store_dir=tmp_path / "nats", log_file=tmp_path / "nats-server.log")
    server.start()
    await server.wait_ready()
    broker = await connect(settings=Settings(nats_url=server.url), name="t")
    outbox = Outbox(broker, timeout=2.0)
    settled: list[bool] = []

    async def then(ok: bool) -> None:
        settled.append(ok)

    try:
        await ensure_topology(broker)
        for i in range(50):
            await outbox.publish(SUBJECT, b"{}", msg_id=f"m{i}", then=then)
        server.stop()
        await eventually(
            lambda: asyncio.sleep(0, broker.nc.is_reconnecting), what="the client to notice"
        )
        for i in range(50, 100):
            await outbox.publish(SUBJECT, b"{}", msg_id=f"m{i}", then=then)
        flushed = asyncio.ensure_future(outbox.flush())
        assert await still_running(flushed, for_=3.0)
        server = restarted(server, tmp_path)
        await asyncio.wait_for(flushed, 90)
        assert settled == [True] * 100
        assert await stored(broker) == 100
    finally:
        await outbox.close()
        await broker.close()
        server.stop()


async def test_a_publish_outlives_the_stream_leader(tmp_path: Path) -> None:
    """The leader of the stream is SIGKILLed: the stream has no leader until the two others
    elect one, and a publish sent meanwhile is stored once, after the election."""
    cluster = NatsCluster.on_loopback(tmp_path / "nats")
    cluster.start()
    try:
        await cluster.wait_healthy()
        broker = await connect(settings=Settings(nats_url=cluster.url, replicas=3), name="t")
        try:
            await ensure_topology(broker)
            await broker.publish(SUBJECT, b"{}", msg_id="before")
            leader = cluster.node(await cluster.leader(subjects.DEAD_STREAM))
            killed = time.monotonic()
            leader.kill()
            await broker.publish(SUBJECT, b"{}", msg_id="during")
            gap = time.monotonic() - killed
            log.warning("publish stored %.1fs after the stream leader was killed", gap)
            assert await broker.publish(SUBJECT, b"{}", msg_id="during") > 0
            new_leader = await cluster.leader(subjects.DEAD_STREAM)
            assert new_leader != leader.name
            assert await stored(broker) == 2
            cluster.start_node(leader)
            await cluster.wait_healthy()
            # The old leader rejoins as a follower and catches up with what it missed.

            async def caught_up() -> bool:
                info = await stream_info(cluster.url, subjects.DEAD_STREAM)
                peers = info.cluster.replicas if info.cluster else []
                return len(peers) == 2 and all(p.current for p in peers)

            await eventually(caught_up, timeout=60, what="the old leader to catch up")
        finally:
            await broker.close()
    finally:
        cluster.stop()


class _Note(msgspec.Struct):
    text: str


async def test_kv_writes_outlive_their_buckets_leader(tmp_path: Path) -> None:
    """The leader of a bucket's stream is SIGKILLed: a create, a put, a compare-and-set and a
    delete made while the two others elect a new one each land once the election is over (the
    "no responders" they draw meanwhile means the write was not applied, so it is sent again)."""
    cluster = NatsCluster.on_loopback(tmp_path / "nats")
    cluster.start()
    try:
        await cluster.wait_healthy()
        setup = await connect(settings=Settings(nats_url=cluster.url, replicas=3), name="setup")
        try:
            await ensure_topology(setup)
            stream = subjects.kv_stream(subjects.JOBS_BUCKET)
            leader = cluster.node(await cluster.leader(stream))
        finally:
            await setup.close()
        # Connected to the two others: a write is then never lost with a dying connection (one
        # that got no answer at all may have been applied, and is not sent again).
        others = ",".join(node.url for node in cluster.nodes if node is not leader)
        broker = await connect(settings=Settings(nats_url=others, replicas=3), name="t")
        try:
            notes = Records(broker, bucket=subjects.JOBS_BUCKET, type=_Note)
            assert await notes.create("kept", _Note(text="one"))
            await notes.put("gone", _Note(text="soon deleted"))
            _, revision = await notes.get("kept")
            killed = time.monotonic()
            leader.kill()
            assert await notes.create("new", _Note(text="created"))
            gap = time.monotonic() - killed
            await notes.swap("kept", _Note(text="two"), revision=revision)
            await notes.put("put", _Note(text="put"))
            await notes.delete("gone")
            log.warning("a KV create landed %.1fs after its bucket's leader was killed", gap)
            assert await cluster.leader(stream) != leader.name
            assert await notes.keys() == ["kept", "new", "put"]
            assert [n.text for n in await notes.all()] == ["two", "created", "put"]
        finally:
            await broker.close()
    finally:
        cluster.stop()
