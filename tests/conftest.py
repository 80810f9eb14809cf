"""Shared fixtures: a real nats-server per test, and a real `datumflow up` around it.

Every test gets its own broker on free ports with its store under the test's temporary directory;
nothing listens on 4222 and nothing outlives the test. What test modules import (Cluster, the
waiting helpers, the repo and pipeline calls) is in tests/helpers.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from datumflow.broker.connection import Broker, connect
from datumflow.broker.topology import ensure_topology
from datumflow.runtime.embedded import EmbeddedServer
from datumflow.settings import Settings
from tests.helpers import Cluster, cluster_env
from tests.s3server import aws_env, moto_process, s3_endpoint  # noqa: F401 - fixtures


# -- brokers and clusters -----------------------------------------------------------------------


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(store_dir=tmp_path / "nats", log_file=tmp_path / "nats-server.log")
    server.start()
    asyncio.run(server.wait_ready())
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture
async def broker(nats_server: EmbeddedServer) -> AsyncIterator[Broker]:
    settings = Settings(nats_url=nats_server.url)
    b = await connect(settings=settings, name="test")
    await ensure_topology(b)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
def make_cluster(tmp_path: Path, nats_server: EmbeddedServer) -> Iterator[Callable[..., Cluster]]:
    """Start `datumflow up` with extra DATUMFLOW_* settings: make_cluster(DATUMFLOW_ACK_WAIT="2")."""
    started: list[Cluster] = []

    def make(**extra: str) -> Cluster:
        home = tmp_path / "home"
        cluster = Cluster(
            home=home, server=nats_server, env=cluster_env(home, nats_server, **extra)
        )
        started.append(cluster)  # stopped at the end even if it fails to start
        cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in started:
            cluster.stop()


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster()
