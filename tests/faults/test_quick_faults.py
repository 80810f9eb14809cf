"""The quick fault suite, run in CI: every kind of fault on small jobs, a few faults of each.

The long form (test_long_faults.py) runs the same rounds, bigger and many more times.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import scenarios
from tests.faults.scenarios import Rig

pytestmark = pytest.mark.asyncio


async def test_reference_run_matches_the_model(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = Rig.start(make_cluster, tmp_path, name="reference")
    figures = await scenarios.reference_round(rig, datums=40)
    assert figures.executions == 40  # no fault: every datum ran exactly once


async def test_workers_killed_again_and_again(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A datum may be hit by several kills: it must not run out of tries for that.
    rig = Rig.start(make_cluster, tmp_path, name="storm", datum_tries=100, DATUMFLOW_ACK_WAIT="2")
    figures = await scenarios.worker_storm_round(rig, datums=120, kills=6, seed=1)
    assert figures.faults == {"worker SIGKILL mid-datum": 6}


async def test_broker_stopped_and_restarted_mid_job(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = Rig.start(make_cluster, tmp_path, name="restarts")
    figures = await scenarios.broker_round(
        rig, datums=100, restarts=2, down_for=2.0, hard=False, seed=2
    )
    assert figures.faults == {"nats-server stop": 2}


async def test_broker_killed_and_restarted_mid_job(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = Rig.start(make_cluster, tmp_path, name="restarts")
    figures = await scenarios.broker_round(
        rig, datums=100, restarts=1, down_for=2.0, hard=True, seed=3
    )
    assert figures.faults == {"nats-server SIGKILL": 1}


async def test_planner_killed_while_planning_a_large_commit(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = Rig.start(make_cluster, tmp_path, name="big")
    figures = await scenarios.planner_round(rig, datums=300, seed=4)
    assert figures.faults == {"planner SIGKILL mid-planning": 1}


async def test_committer_killed_while_counting_and_committing(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The crash point: right after the committer stores the job's datum index, that is after the
    # output commit landed and before the job record says SUCCESS.
    rig = Rig.start(
        make_cluster,
        tmp_path,
        name="commits",
        DATUMFLOW_STORAGE_FAULTS="crash=committer:put_bytes:2",
    )
    figures = await scenarios.committer_round(rig, datums=60, kills=1, seed=5)
    assert figures.faults == {"committer SIGKILL mid-job": 1, "committer crash mid-commit": 1}


async def test_whole_datumflow_up_stopped_and_started_mid_job(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = Rig.start(make_cluster, tmp_path, name="bounce")
    figures = await scenarios.restart_up_round(rig, datums=80, restarts=1, seed=6)
    assert figures.faults == {"datumflow up stopped and started": 1}


async def test_slow_failing_object_store(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = Rig.start(
        make_cluster,
        tmp_path,
        name="slow",
        DATUMFLOW_STORAGE_FAULTS="latency=0.01,jitter=0.04,errors=0.1,seed=7",
    )
    figures = await scenarios.slow_store_round(rig, datums=80, seed=7)
    assert sum(figures.faults.values()) >= 10
