"""Shared fixtures: a real nats-server per test, and a real `datumflow up` around it; and the
checks every test gets: no asyncio task left running when an async test ends.

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

LEFTOVER_GRACE = 1.0
"""Seconds a task still running when its test ends gets to finish (one cancelled in a `finally`
may need a turn or two of the loop) before it counts as left behind."""


# -- scheduling -----------------------------------------------------------------------------------


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's `--dist loadfile`, but with every module of tests/cluster/ in one unit, and
    the long units first: each cluster test runs seven hosts (three nats-servers, S3, datumflow)
    on the two cores, and two at once, one per xdist process, slowed each other down. The cluster
    unit starts at once in one process while the other goes through the rest; the quick modules
    come last, to even out the end."""
    from xdist.scheduler import LoadFileScheduling

    class ClusterTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith("tests/cluster/"):
                return "tests/cluster"
            return super()._split_scope(nodeid)

        def _assign_work_unit(self, node: object) -> None:
            # The long modules first, the quick ones last: they fill the end evenly.
            queue = sorted(self.workqueue.items(), key=lambda unit: -_slowness(unit[0]))
            self.workqueue.clear()
            self.workqueue.update(queue)
            super()._assign_work_unit(node)  # type: ignore[arg-type]

    return ClusterTogether(config, log)


SLOW_MODULES = ("e2e", "failover", "ingest", "metrics", "browser", "autoscale", "s3", "consumers")
"""Words in the names of the modules that run a whole `datumflow up` through jobs."""


def _slowness(scope: str) -> int:
    """How early a unit of tests should start: the cluster first, then the fault suite, then the
    modules that run whole deployments, then the rest."""
    if scope == "tests/cluster":
        return 3
    if scope.startswith("tests/faults/"):
        return 2
    return 1 if any(word in scope for word in SLOW_MODULES) else 0


# -- no task left behind ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_leftover_tasks(request: pytest.FixtureRequest) -> None:
    """Fail an async test that leaves asyncio tasks running: a task that outlives its test runs
    on against a broker and files that are gone, and hides a missing cancel or close. Requested
    first (autouse), its teardown runs after every other fixture's, on the test's own loop."""
    marker = request.node.get_closest_marker("asyncio")
    # The check runs on a function-scoped loop: a test on a longer-lived loop shares it with
    # others, and what is left on it is theirs to judge.
    if marker is not None and marker.kwargs.get("loop_scope", "function") == "function":
        request.getfixturevalue("_leftover_task_check")


@pytest_asyncio.fixture
async def _leftover_task_check() -> AsyncIterator[None]:
    yield
    current = asyncio.current_task()
    running = {t for t in asyncio.all_tasks() if t is not current and not t.done()}
    if running:
        await asyncio.wait(running, timeout=LEFTOVER_GRACE)
    left = [t for t in running if not t.done()]
    if not left:
        return
    names = "\n".join(f"  {_describe(t)}" for t in left)
    for task in left:  # the loop closes next: do not leave them to be destroyed pending
        task.cancel()
    await asyncio.wait(left, timeout=LEFTOVER_GRACE)
    pytest.fail(f"the test left {len(left)} asyncio task(s) running:\n{names}", pytrace=False)


def _describe(task: asyncio.Task[object]) -> str:
    """The task's name, its coroutine, and where that was when the test ended."""
    coro = task.get_coro()
    what = getattr(coro, "__qualname__", repr(coro))
    frames = task.get_stack(limit=1)
    where = f" at {frames[0].f_code.co_filename}:{frames[0].f_lineno}" if frames else ""
    return f"{task.get_name()}: {what}{where}"


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
