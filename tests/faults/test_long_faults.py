"""The long fault suite, run by hand: the quick suite's rounds, on 500-datum jobs, a thousand faults
and more. Skipped unless DATUMFLOW_LONG_FAULTS=1; DATUMFLOW_LONG_ROUNDS scales the rounds (default
1.0). Each round appends its figures to $DATUMFLOW_FAULT_REPORT when that is set:

    DATUMFLOW_LONG_FAULTS=1 DATUMFLOW_FAULT_REPORT=/tmp/faults.jsonl \\
        .venv/bin/python -m pytest tests/faults/test_long_faults.py -p no:timeout -s
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults import scenarios
from tests.faults.scenarios import Rig

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.slow,
    pytest.mark.timeout(0),
    pytest.mark.skipif(
        os.environ.get("DATUMFLOW_LONG_FAULTS") != "1",
        reason="the long fault form runs by hand: DATUMFLOW_LONG_FAULTS=1",
    ),
]

DATUMS = 500


def rounds(n: int) -> int:
    return max(1, round(n * float(os.environ.get("DATUMFLOW_LONG_ROUNDS", "1"))))


async def test_long_worker_storm(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = Rig.start(make_cluster, tmp_path, name="storm", datum_tries=1000, DATUMFLOW_ACK_WAIT="2")
    for i in range(rounds(8)):
        await scenarios.worker_storm_round(rig, datums=DATUMS, kills=40, seed=100 + i, timeout=1800)


async def test_long_broker_restarts(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = Rig.start(make_cluster, tmp_path, name="restarts")
    for i in range(rounds(10)):
        await scenarios.broker_round(
            rig, datums=DATUMS // 2, restarts=3, down_for=1.5, hard=i % 2 == 1, seed=200 + i
        )


async def test_long_planner_kills(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = Rig.start(make_cluster, tmp_path, name="big")
    for i in range(rounds(12)):
        await scenarios.planner_round(rig, datums=DATUMS, seed=300 + i, timeout=600)


async def test_long_committer_kills(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = Rig.start(
        make_cluster,
        tmp_path,
        name="commits",
        DATUMFLOW_STORAGE_FAULTS="crash=committer:put_bytes:1",
    )
    for i in range(rounds(12)):
        await scenarios.committer_round(rig, datums=DATUMS // 2, kills=4, seed=400 + i)


async def test_long_committer_crash_after_the_commit_landed(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = Rig.start(
        make_cluster,
        tmp_path,
        name="commits2",
        DATUMFLOW_STORAGE_FAULTS="crash=committer:put_bytes:2",
    )
    for i in range(rounds(6)):
        await scenarios.committer_round(rig, datums=DATUMS // 5, kills=2, seed=450 + i)


async def test_long_whole_up_restarts(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = Rig.start(make_cluster, tmp_path, name="bounce")
    for i in range(rounds(8)):
        await scenarios.restart_up_round(rig, datums=DATUMS // 2, restarts=2, seed=500 + i)


async def test_long_slow_failing_store(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = Rig.start(
        make_cluster,
        tmp_path,
        name="slow",
        DATUMFLOW_STORAGE_FAULTS="latency=0.01,jitter=0.05,errors=0.15,seed=11",
    )
    for i in range(rounds(3)):
        await scenarios.slow_store_round(rig, datums=DATUMS, seed=600 + i, timeout=900)
