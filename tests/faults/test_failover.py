"""Two replicas of each control-plane function, and the active one killed or paused mid-job: the
job ends SUCCESS, exact, with the output of a fault-free run; the other replica takes over
within seconds (the gap is printed, and bounded here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from datumflow.broker.topology import CONTROL_ACK_WAIT, LEASE_TTL
from tests.faults import failover
from tests.faults.failover import REPLICAS, SlowRig
from tests.faults.harness import function_pids
from tests.helpers import Cluster, cluster_env, eventually

pytestmark = pytest.mark.asyncio


async def test_active_committer_killed_then_paused_mid_job(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two jobs on one rig: the active committer SIGKILLed in the first; in the second, the
    active one SIGSTOPped until the other took over, then woken: it writes nothing."""
    rig = SlowRig.start(make_cluster, tmp_path, name="failover", **REPLICAS)
    figures, gap = await failover.committer_failover_round(rig, datums=48, seed=11, pause=False)
    print(f"committer takeover after SIGKILL: {gap:.2f}s")
    assert figures.lost == figures.duplicated == 0
    assert gap < LEASE_TTL + 3
    figures, gap = await failover.committer_failover_round(rig, datums=64, seed=12, pause=True)
    print(f"committer takeover after SIGSTOP: {gap:.2f}s")
    assert figures.lost == figures.duplicated == 0
    assert gap < LEASE_TTL + 3


async def test_planning_planner_killed_mid_planning(nats_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Started as a user would: `datumflow up --replicas 2`.
    home = tmp_path / "home"
    cluster = Cluster(home=home, server=nats_server, env=cluster_env(home, nats_server))
    cluster.up_args = ("--replicas", "2")
    try:
        cluster.start()
        await eventually(
            lambda: [len(function_pids(cluster, f)) for f in ("planner", "committer", "ingest")],
            until=lambda counts: counts == [2, 2, 2],
            what="two of each function",
        )
        rig = SlowRig(cluster, tmp_path=tmp_path, name="plans", datum_tries=3)
        rig.pause = 0.0
        _, gap = await failover.planner_failover_round(rig, datums=200, seed=13)
    finally:
        cluster.stop()
    print(f"planner takeover after SIGKILL: {gap:.2f}s")
    assert gap < CONTROL_ACK_WAIT + 5
