"""Shared fixtures: a real nats-server per test, and a real `datumflow up` around it.

Every test gets its own broker on free ports with its store under the test's temporary directory;
nothing listens on 4222 and nothing outlives the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest
import pytest_asyncio

from datumflow.broker.connection import Broker, connect
from datumflow.broker.topology import ensure_topology
from datumflow.cli.context import Api, open_api
from datumflow.runtime.embedded import EmbeddedServer, read_instance
from datumflow.settings import Settings

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"


async def eventually(
    check: Callable[[], Awaitable[T]],
    *,
    timeout: float = 30.0,
    interval: float = 0.1,
    what: str = "",
) -> T:
    """Poll `check` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what or check}: last {last!r}"
    )


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


class Cluster:
    """`datumflow up` as a child process, using the test's nats-server."""

    def __init__(self, *, home: Path, server: EmbeddedServer, env: dict[str, str]) -> None:
        self.home = home
        self.server = server
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.settings = Settings(
            home=str(home),
            nats_url=server.url,
            monitor_url=server.monitor,
            storage=(home / "objects").as_uri(),
            ack_wait=float(env.get("DATUMFLOW_ACK_WAIT", "30")),
        )

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "up.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "datumflow.cli.main", "--home", str(self.home), "up"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            instance = read_instance(self.home)
            if instance is not None and instance.pid == self.process.pid:
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"datumflow up exited: {self.log('up')}")
            time.sleep(0.05)
        raise RuntimeError("datumflow up did not start")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self, name: str) -> str:
        path = self.home / ("up.log" if name == "up" else f"logs/{name}.log")
        try:
            return path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return f"(no {path})"

    def cli(
        self, *args: str, input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the real `datumflow` command against this cluster."""
        result = subprocess.run(
            [sys.executable, "-m", "datumflow.cli.main", "--home", str(self.home), *args],
            env=self.env,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"datumflow {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    @contextlib.asynccontextmanager
    async def api(self) -> AsyncIterator[Api]:
        async with open_api(self.settings) as api:
            yield api

    def worker_pids(self, pipeline: str) -> list[int]:
        """Worker processes of `pipeline` started by this cluster's supervisor."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            if (
                b"worker" in argv
                and pipeline.encode() in argv
                and str(self.home).encode() in environ
            ):
                pids.append(int(proc.name))
        return pids


def cluster_env(home: Path, server: EmbeddedServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
    env.update(
        DATUMFLOW_HOME=str(home),
        DATUMFLOW_NATS_URL=server.url,
        DATUMFLOW_MONITOR_URL=server.monitor,
        DATUMFLOW_STORAGE=(home / "objects").as_uri(),
        DATUMFLOW_ACK_WAIT="3",
        DATUMFLOW_GRACE="5",
    )
    env.update(extra)
    return env


@pytest.fixture
def make_cluster(tmp_path: Path, nats_server: EmbeddedServer) -> Iterator[Callable[..., Cluster]]:
    """Start `datumflow up` with extra DATUMFLOW_* settings: make_cluster(DATUMFLOW_ACK_WAIT="2")."""
    started: list[Cluster] = []

    def make(**extra: str) -> Cluster:
        home = tmp_path / "home"
        cluster = Cluster(
            home=home, server=nats_server, env=cluster_env(home, nats_server, **extra)
        )
        cluster.start()
        started.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in started:
            cluster.stop()


@contextlib.contextmanager
def shared_cluster(root: Path, **extra: str) -> Iterator[Cluster]:
    """One nats-server and one `datumflow up` for a whole module, where each test uses its own
    repo and pipeline: starting them costs more than most tests."""
    server = EmbeddedServer(store_dir=root / "nats", log_file=root / "nats-server.log")
    server.start()
    asyncio.run(server.wait_ready())
    home = root / "home"
    shared = Cluster(home=home, server=server, env=cluster_env(home, server, **extra))
    try:
        shared.start()
        yield shared
    finally:
        shared.stop()
        server.stop()


def marks_of(marks: Path) -> list[str]:
    """Names of the mark files user code left (`<input file>.<shell pid>`), one per attempt."""
    return sorted(p.name.rsplit(".", 1)[0] for p in marks.iterdir())


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster()


def spec_json(**fields: object) -> bytes:
    return msgspec.json.encode(fields)
