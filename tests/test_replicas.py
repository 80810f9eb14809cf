"""DATUMFLOW_REPLICAS: every stream, bucket and durable consumer datumflow declares is kept on that
many servers; an R1 topology is upgraded in place, and what the broker cannot keep is refused
before anything changes. Against a real single nats-server and a real three-node cluster."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest
import pytest_asyncio

from datumflow.broker import subjects
from datumflow.broker.connection import Broker, connect
from datumflow.broker.topology import BUCKETS, SHARED_CONSUMERS, STREAMS, ensure_topology
from datumflow.errors import TopologyRefused
from datumflow.runtime.embedded import EmbeddedServer, free_port
from datumflow.settings import Settings
from tests.helpers import eventually
from tests.natscluster import NatsCluster

pytestmark = pytest.mark.asyncio

STREAM_NAMES = [c.name or "" for c in STREAMS] + [subjects.kv_stream(b.bucket) for b in BUCKETS]


async def replicas(broker: Broker) -> dict[str, int]:
    return {
        name: (await broker.js.stream_info(name)).config.num_replicas or 1 for name in STREAM_NAMES
    }


async def test_the_setting_is_read_from_the_environment() -> None:
    assert Settings.from_env({}).replicas == 1
    assert Settings.from_env({"DATUMFLOW_REPLICAS": "3"}).replicas == 3
    with pytest.raises(ValueError, match="DATUMFLOW_REPLICAS='three': expected a whole number"):
        Settings.from_env({"DATUMFLOW_REPLICAS": "three"})
    with pytest.raises(ValueError, match="1 to 5 replicas"):
        Settings.from_env({"DATUMFLOW_REPLICAS": "7"})


async def test_one_replica_by_default(broker: Broker) -> None:
    assert set((await replicas(broker)).values()) == {1}
    await ensure_topology(broker)  # again: nothing changes, nothing fails
    assert set((await replicas(broker)).values()) == {1}


async def test_a_single_server_refuses_three_replicas_before_anything_changes(
    nats_server: EmbeddedServer,
) -> None:
    broker = await connect(settings=Settings(nats_url=nats_server.url, replicas=3), name="t")
    try:
        with pytest.raises(TopologyRefused) as refused:
            await ensure_topology(broker)
        text = str(refused.value)
        assert "single nats-server" in text
        assert "DATUMFLOW_REPLICAS=1" in text and "cluster of at least 3" in text
        assert (await broker.js.account_info()).streams == 0
    finally:
        await broker.close()


@pytest_asyncio.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    cluster = NatsCluster.on_loopback(tmp_path / "nats")
    try:
        cluster.start()
        await cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()


async def test_an_r1_topology_is_upgraded_in_place(nats_cluster: NatsCluster) -> None:
    one = await connect(settings=Settings(nats_url=nats_cluster.url), name="r1")
    three = await connect(settings=Settings(nats_url=nats_cluster.url, replicas=3), name="r3")
    five = await connect(settings=Settings(nats_url=nats_cluster.url, replicas=5), name="r5")
    try:
        await ensure_topology(one)
        assert set((await replicas(one)).values()) == {1}
        kv = await one.kv(subjects.REPOS_BUCKET)

        async def put_kept() -> bool:
            # The bucket's stream has just been made: until its leader is placed, no one answers.
            try:
                await kv.put("kept", b"across the upgrade")
            except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
                return False
            return True

        await eventually(put_kept, timeout=30, what="the new bucket to take a write")
        await one.publish(subjects.dead("test"), Settings(), msg_id="kept")

        # More than the cluster has servers: refused at the first stream, naming it and what to
        # do, and no stream is changed.
        with pytest.raises(TopologyRefused) as refused:
            await ensure_topology(five, patience=1.0)
        text = str(refused.value)
        assert f"stream {subjects.COMMITS_STREAM} has 1 replica(s)" in text
        assert "at least 5 nats-servers" in text and "DATUMFLOW_REPLICAS" in text
        assert set((await replicas(one)).values()) == {1}

        await ensure_topology(three)
        assert set((await replicas(three)).values()) == {3}
        assert (await kv.get("kept")).value == b"across the upgrade"
        dead = await three.js.stream_info(subjects.DEAD_STREAM)
        assert dead.state.messages == 1
        # Durable consumers take their stream's replicas (the leader and two more peers), once
        # the server has moved them: until they have a leader, asking about one times out.
        for stream, consumer in SHARED_CONSUMERS:

            async def scaled(stream: str = stream, name: str = consumer.durable_name or "") -> bool:
                try:
                    info = await three.js.consumer_info(stream, name, timeout=2)
                except nats.errors.TimeoutError:
                    return False
                return info.cluster is not None and len(info.cluster.replicas or []) == 2

            await eventually(scaled, what=f"{stream}'s consumer on three servers")

        # A function started without the setting does not shrink them back.
        await ensure_topology(one)
        assert set((await replicas(one)).values()) == {3}
    finally:
        for broker in (one, three, five):
            await broker.close()


async def test_streams_declared_before_the_last_server_joins_wait_for_it(tmp_path: Path) -> None:
    """A function started while the cluster is still gathering its servers (two of three up, as
    when pods start in any order): the cluster answers "no suitable peers for placement" to a
    stream of three replicas until the third joins. The declaration waits for it, rather than
    failing the function's start; a cluster that never gets the servers is refused, saying so."""
    cluster = NatsCluster.on_loopback(tmp_path / "nats")
    *early, late = cluster.nodes
    broker: Broker | None = None
    try:
        for node in early:
            cluster.start_node(node)
        await cluster.wait_healthy()
        broker = await connect(
            settings=Settings(nats_url=",".join(n.url for n in early), replicas=3), name="early"
        )
        # Refused, saying what to do, when the servers do not come in time.
        with pytest.raises(TopologyRefused, match="no suitable peers for placement"):
            await ensure_topology(broker, patience=1.0)

        declaring = asyncio.create_task(ensure_topology(broker))
        done, _ = await asyncio.wait({declaring}, timeout=3)
        assert not done, "the declaration gave up while the cluster was gathering its servers"
        cluster.start_node(late)
        await asyncio.wait_for(declaring, timeout=60)
        assert set((await replicas(broker)).values()) == {3}
    finally:
        if broker is not None:
            await broker.close()
        cluster.stop()


async def test_a_url_of_several_servers_reconnects_to_a_survivor(nats_cluster: NatsCluster) -> None:
    """DATUMFLOW_NATS_URL lists servers separated by commas (spaces allowed); one that does not
    answer is passed over, and when the server in use dies the client moves to a survivor."""
    url = f"nats://127.0.0.1:{free_port()}, {nats_cluster.url}"
    broker = await connect(settings=Settings(nats_url=url, replicas=3), name="several")
    try:
        await ensure_topology(broker)
        first = broker.nc.connected_url
        assert first is not None
        used = next(n for n in nats_cluster.nodes if n.port == first.port)
        used.kill()
        await broker.publish(subjects.dead("test"), b"{}", msg_id="after")

        async def moved() -> bool:
            now = broker.nc.connected_url
            return broker.nc.is_connected and now is not None and now.port != used.port

        await eventually(moved, what="the client to reconnect to a survivor")
        assert (await broker.js.stream_info(subjects.DEAD_STREAM)).state.messages == 1
    finally:
        await broker.close()


async def test_up_refuses_replicas_its_broker_cannot_keep(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    """`datumflow up` says what to do, without a traceback, both with its embedded broker and
    with an external single server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
    env.update(DATUMFLOW_REPLICAS="3", DATUMFLOW_HOME=str(tmp_path / "home"))
    for extra, says in [
        ({}, "the embedded broker is one: set DATUMFLOW_NATS_URL"),
        ({"DATUMFLOW_NATS_URL": nats_server.url}, "the broker is a single nats-server"),
    ]:
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "datumflow.cli.main", "up"],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, done.stderr
        assert says in done.stderr and "DATUMFLOW_REPLICAS=1" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
