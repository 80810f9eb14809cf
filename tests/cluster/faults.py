"""The faults the cluster tests inject, each one fault and its recovery, timed: a server SIGKILLed
(the leader of the datums stream, of the workers' consumer, or any), a server's host cut off the
network for a while, the three servers restarted in turn, a worker host cut off past ack_wait, the
host of the active committer lost.

Each returns once the cluster is whole again (the server back and caught up), with what it
measured; the quick tests run each once, the long form loops over them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request

import msgspec
import nats
from nats.js.errors import KeyNotFoundError

from datumflow.broker import subjects
from datumflow.broker.records import LeaseInfo
from tests.cluster.deployment import CONTROL, Deployment, Workload
from tests.helpers import eventually
from tests.natscluster import NatsCluster, Node


class Fault(msgspec.Struct, kw_only=True):
    """One fault injected: what, on which server, and how long until a new leader was elected."""

    kind: str
    node: str
    new_leader: str = ""
    election: float = 0.0
    """Seconds from the fault to a new leader (0 where no election was timed)."""
    at: float = 0.0
    """When it was injected (time.monotonic())."""


async def rejoin(d: Deployment, node: Node, *, timeout: float = 60) -> None:
    """Until the datums stream has its three replicas again, all caught up."""
    await eventually(
        d.replicas_current, timeout=timeout, interval=0.2, what=f"{node.name} to rejoin"
    )


async def kill_stream_leader(d: Deployment, *, restart: bool = True) -> Fault:
    """SIGKILL the leader of DF_DATUMS; time the election of another; start it again."""
    leader = d.nats.node(await d.nats.leader(subjects.DATUMS_STREAM))
    killed = time.monotonic()
    leader.kill()
    new_leader = await d.nats.leader(subjects.DATUMS_STREAM, timeout=60, other_than=leader.name)
    election = time.monotonic() - killed
    if restart:
        d.nats.start_node(leader)
        await rejoin(d, leader)
    return Fault(
        kind="DF_DATUMS leader SIGKILL",
        node=leader.name,
        new_leader=new_leader,
        election=election,
        at=killed,
    )


async def kill_consumer_leader(d: Deployment, pipeline: str) -> Fault:
    """SIGKILL the leader of the workers' durable consumer; time the election; start it again."""
    durable = subjects.worker_consumer(pipeline)
    leader = d.nats.node(await d.nats.consumer_leader(subjects.DATUMS_STREAM, durable))
    killed = time.monotonic()
    leader.kill()
    new_leader = await d.nats.consumer_leader(
        subjects.DATUMS_STREAM, durable, timeout=60, other_than=leader.name
    )
    election = time.monotonic() - killed
    d.nats.start_node(leader)
    return Fault(
        kind="worker consumer leader SIGKILL",
        node=leader.name,
        new_leader=new_leader,
        election=election,
        at=killed,
    )


async def kill_any_server(d: Deployment, name: str) -> Fault:
    """SIGKILL the server `name`, leader or not, and start it again at once."""
    node = d.nats.node(name)
    killed = time.monotonic()
    node.kill()
    d.nats.start_node(node)
    await rejoin(d, node)
    return Fault(kind="nats-server SIGKILL", node=name, at=killed)


async def partition_stream_leader(d: Deployment, *, seconds: float) -> Fault:
    """Cut the host of the DF_DATUMS leader off the network for `seconds`: the two others elect
    a leader of their own (asked of them alone), and the host comes back as a follower."""
    leader = d.nats.node(await d.nats.leader(subjects.DATUMS_STREAM))
    host = d.lab[leader.name]
    host.cut()
    cut = time.monotonic()
    try:
        survivors = NatsCluster([n for n in d.nats.nodes if n is not leader])
        new_leader = await survivors.leader(
            subjects.DATUMS_STREAM, timeout=60, other_than=leader.name
        )
        election = time.monotonic() - cut
        await eventually(
            lambda: asyncio.sleep(0, time.monotonic() - cut >= seconds),
            timeout=seconds + 60,
            what=f"{seconds:.0f} s",
        )
    finally:
        host.heal()
    return Fault(
        kind=f"DF_DATUMS leader host cut off for {seconds:.0f} s",
        node=leader.name,
        new_leader=new_leader,
        election=election,
        at=cut,
    )


async def rolling_restart(d: Deployment) -> list[Fault]:
    """Each server in turn stopped (SIGTERM) and started, the next once it has caught up, as an
    upgrade of the cluster would go."""
    faults = []
    for node in d.nats.nodes:
        stopped = time.monotonic()
        node.stop()
        d.nats.start_node(node)
        await d.nats.wait_healthy()
        await rejoin(d, node)
        faults.append(Fault(kind="nats-server stopped and started", node=node.name, at=stopped))
    return faults


async def lease_holder(d: Deployment, function: str) -> LeaseInfo | None:
    """Who holds `function`'s lease, read from the `df_leases` bucket (None: nobody, or the
    broker did not answer)."""
    try:
        nc = await nats.connect(d.server.url, connect_timeout=2, max_reconnect_attempts=1)
    except Exception:
        return None
    try:
        kv = await nc.jetstream(timeout=2).key_value(subjects.LEASES_BUCKET)
        entry = await kv.get(function)
        return msgspec.json.decode(entry.value, type=LeaseInfo) if entry.value else None
    except (KeyNotFoundError, TimeoutError, nats.errors.Error):
        return None
    finally:
        await nc.close()


def host_of(d: Deployment, pid: int) -> str:
    """The control host (network namespace) process `pid` runs on."""
    out = subprocess.run(
        ["ip", "netns", "identify", str(pid)], capture_output=True, text=True, timeout=10
    ).stdout.strip()
    return next((name for name in CONTROL if d.lab[name].namespace == out), out or "?")


async def power_off(d: Deployment, name: str, active: LeaseInfo) -> tuple[LeaseInfo, float]:
    """Host `name` loses power: its link goes down (nothing it sends gets out) and every process
    on it is SIGKILLed. Until another committer than `active` holds the lease: that one's lease,
    and the seconds the takeover took."""
    host = d.lab[name]
    down = time.monotonic()
    host.cut()
    host.kill_all()
    new = await eventually(
        lambda: lease_holder(d, "committer"),
        until=lambda lease: lease is not None and lease.holder != active.holder,
        timeout=60,
        interval=0.1,
        what="another committer to take the lease",
    )
    return new, time.monotonic() - down


async def lose_active_control_host(d: Deployment, workload: Workload) -> Fault:
    """The host of the active committer loses power (`power_off`); timed until the other host's
    committer holds the lease. Then the host comes back and its `datumflow up` starts again,
    standing by for the next loss."""
    active = await eventually(
        lambda: lease_holder(d, "committer"), timeout=60, what="an active committer"
    )
    name = host_of(d, active.pid)
    down = time.monotonic()
    new, takeover = await power_off(d, name, active)
    d.lab[name].heal()
    # Left by the `up` that was killed: the new one is known to have started once it writes its own.
    (d.root / name / "instance.json").unlink(missing_ok=True)
    await workload.up(name)
    return Fault(
        kind="control-plane host lost (link cut, every process SIGKILLed)",
        node=name,
        new_leader=host_of(d, new.pid),
        election=takeover,
        at=down,
    )


def from_host(nats: NatsCluster, address: str) -> dict[tuple[str, int], int]:
    """Messages each connection from clients at `address` has sent, as the broker's servers
    count them (their /connz), by (server, connection id). A connection closed since a reading
    is gone from the next one: compare connection by connection (`sent_since`), never totals."""
    sent: dict[tuple[str, int], int] = {}
    for node in nats.nodes:
        if not node.running:
            continue
        url = f"http://{node.host}:{node.monitor_port}/connz?limit=1024"
        with urllib.request.urlopen(url, timeout=2) as resp:
            connz = json.load(resp)
        for c in connz.get("connections") or []:
            if c["ip"] == address:
                sent[(node.name, c["cid"])] = c["in_msgs"]
    return sent


def sent_since(before: dict[tuple[str, int], int], now: dict[tuple[str, int], int]) -> int:
    """Messages sent between two readings of `from_host`, on connections old and new."""
    return sum(max(count - before.get(key, 0), 0) for key, count in now.items())


def tally(faults: list[Fault]) -> dict[str, int]:
    """Faults by kind, as tests.faults.harness.Figures counts them."""
    counts: dict[str, int] = {}
    for fault in faults:
        counts[fault.kind] = counts.get(fault.kind, 0) + 1
    return counts
