"""A cluster of real nats-servers with JetStream, routed to each other, for tests.

Each node is one nats-server process with its own store directory and ports. Nodes run on
loopback by default; the multi-host harness (tests/hosts.py) gives each one the address of a host
and a launcher that runs it inside that host's network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import msgspec
import nats

from datumflow.runtime.embedded import free_port, server_binary
from tests.helpers import eventually

CLUSTER_NAME = "df-test"


class Node:
    """One nats-server of the cluster."""

    def __init__(
        self,
        *,
        name: str,
        root: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        cluster_port: int = 0,
        monitor_port: int = 0,
        launcher: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.host = host
        self.port = port or free_port()
        self.cluster_port = cluster_port or free_port()
        self.monitor_port = monitor_port or free_port()
        self.store_dir = root / name
        self.log_file = root / f"{name}.log"
        self.launcher = list(launcher)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def route(self) -> str:
        return f"nats-route://{self.host}:{self.cluster_port}"

    def config(self, routes: list[str], *, extra: str = "", jetstream: str = "") -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        path = self.store_dir.parent / f"{self.name}.conf"
        path.write_text(
            "\n".join(
                [
                    f"server_name: {self.name}",
                    f"host: {self.host}",
                    f"port: {self.port}",
                    f"http: {self.host}:{self.monitor_port}",
                    "max_payload: 8388608",
                    "jetstream {",
                    f"  store_dir: {json.dumps(str(self.store_dir))}",
                    f"  {jetstream}",
                    "}",
                    *self._cluster_block(routes),
                    extra,
                    "",
                ]
            )
        )
        return path

    def _cluster_block(self, routes: list[str]) -> list[str]:
        """Routes to the other nodes; none for a cluster of one (a standalone server)."""
        if not routes:
            return []
        return [
            "cluster {",
            f"  name: {CLUSTER_NAME}",
            f"  host: {self.host}",
            f"  port: {self.cluster_port}",
            f"  routes: {json.dumps(routes)}",
            "}",
        ]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the node dies as on a power cut, without leaving the cluster in order."""
        if self.running:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def healthy(self) -> bool:
        """/healthz: JetStream is up and this node has caught up with the cluster's metadata."""
        url = f"http://{self.host}:{self.monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return int(resp.status) == 200
        except (OSError, ValueError):
            return False


class NatsCluster:
    def __init__(
        self,
        nodes: list[Node],
        *,
        extra_config: str = "",
        jetstream: str = "",
        own_sessions: bool = True,
        threads: int = 1,
    ) -> None:
        self.nodes = nodes
        self.threads = threads
        """GOMAXPROCS of each server: one keeps a test cluster light on a busy machine."""
        self.own_sessions = own_sessions
        """Each server in a session of its own (as on hosts of their own); False keeps them in
        the caller's, so that one server or three get the same share of a busy machine's CPU."""
        self.extra_config = extra_config
        self.jetstream = jetstream
        """More lines of each server's jetstream block, e.g. "sync_interval: always"."""

    @classmethod
    def on_loopback(
        cls,
        root: Path,
        size: int = 3,
        *,
        extra_config: str = "",
        jetstream: str = "",
        own_sessions: bool = True,
        threads: int = 1,
    ) -> NatsCluster:
        return cls(
            [Node(name=f"n{i + 1}", root=root) for i in range(size)],
            extra_config=extra_config,
            jetstream=jetstream,
            own_sessions=own_sessions,
            threads=threads,
        )

    @property
    def url(self) -> str:
        """Every node, as DATUMFLOW_NATS_URL lists them."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def start_node(self, node: Node) -> None:
        routes = [other.route for other in self.nodes if other is not node]
        config = node.config(routes, extra=self.extra_config, jetstream=self.jetstream)
        with open(node.log_file, "ab") as log:
            node.process = subprocess.Popen(
                [*node.launcher, server_binary(), "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=self.own_sessions,
                env={**os.environ, "GOMAXPROCS": str(self.threads)},
            )

    def start(self) -> None:
        for node in self.nodes:
            self.start_node(node)

    async def wait_healthy(self, *, timeout: float = 60.0) -> None:
        """Until every running node reports JetStream healthy and the cluster has a meta leader."""

        async def healthy() -> bool:
            for node in self.nodes:
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(
                        f"nats-server {node.name} exited with code {node.process.returncode}:"
                        f" {node.log_file.read_text(errors='replace')[-2000:]}"
                    )
            checks = [asyncio.to_thread(n.healthy) for n in self.nodes if n.running]
            return all(await asyncio.gather(*checks))

        await eventually(
            healthy, timeout=timeout, interval=0.2, what="every node of the nats cluster healthy"
        )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    async def leader(self, stream: str, *, timeout: float = 30.0, other_than: str = "") -> str:
        """The name of the node leading `stream` (from $JS.API.STREAM.INFO's cluster info); with
        `other_than`, a leader other than that node (a server may still name a leader that was
        just killed, until it notices: that is no answer to "who leads now")."""

        async def leader() -> str:
            # Asked of the running nodes only, briefly: this also times elections.
            running = ",".join(node.url for node in self.nodes if node.running)
            with contextlib.suppress(Exception):  # while the cluster settles, anything may fail
                info = await stream_info(running, stream, timeout=1.0)
                if info.cluster is not None and info.cluster.leader != other_than:
                    return info.cluster.leader
            return ""

        return await eventually(
            leader, timeout=timeout, interval=0.1, what=f"stream {stream} to have a leader"
        )

    async def consumer_leader(
        self, stream: str, consumer: str, *, timeout: float = 30.0, other_than: str = ""
    ) -> str:
        """The name of the node leading the durable `consumer` of `stream` (other than
        `other_than`, as for `leader`)."""

        async def leader() -> str:
            running = [node.url for node in self.nodes if node.running]
            with contextlib.suppress(Exception):  # while the cluster settles, anything may fail
                nc = await nats.connect(running, connect_timeout=2, max_reconnect_attempts=1)
                try:
                    answer = await nc.request(
                        f"$JS.API.CONSUMER.INFO.{stream}.{consumer}", b"", timeout=1.0
                    )
                finally:
                    await nc.close()
                info = msgspec.json.decode(answer.data, type=_ConsumerInfo)
                if info.cluster is not None and info.cluster.leader != other_than:
                    return info.cluster.leader
            return ""

        return await eventually(
            leader, timeout=timeout, interval=0.1, what=f"consumer {consumer} to have a leader"
        )


class _Peer(msgspec.Struct):
    name: str
    current: bool = False


class _ClusterInfo(msgspec.Struct):
    leader: str = ""
    replicas: list[_Peer] = []


class _ConsumerInfo(msgspec.Struct):
    cluster: _ClusterInfo | None = None


class _Config(msgspec.Struct):
    num_replicas: int = 1


class _State(msgspec.Struct):
    messages: int = 0


class StreamInfo(msgspec.Struct):
    config: _Config
    state: _State
    cluster: _ClusterInfo | None = None


async def stream_info(url: str, stream: str, *, timeout: float = 5.0) -> StreamInfo:
    """STREAM.INFO asked directly, as an operator's `nats stream info` would."""
    nc = await nats.connect(url.split(","), connect_timeout=2, max_reconnect_attempts=1)
    try:
        answer = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=timeout)
    finally:
        await nc.close()
    return msgspec.json.decode(answer.data, type=StreamInfo)
