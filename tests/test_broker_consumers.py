"""An idle `datumflow up` leaves no consumers behind: listing a KV bucket (the supervisor's tick,
the planner's loop, many times a second) must not create one that outlives the listing."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import pytest

from datumflow.broker import subjects
from tests.conftest import Cluster, eventually

pytestmark = pytest.mark.asyncio

WINDOW = 20.0
"""Seconds an idle cluster is watched: the old listing left ~6 consumers a second behind."""


def consumer_count(monitor: str) -> int:
    """Consumers on the server, as its monitoring endpoint counts them."""
    with urllib.request.urlopen(f"http://{monitor}/jsz", timeout=5) as answer:
        return int(json.load(answer)["consumers"])


async def test_an_idle_up_holds_a_constant_number_of_consumers(
    cluster: Cluster, tmp_path: Path
) -> None:
    async with cluster.api() as api:
        await api.repos.create_repo("idle")
    spec = {
        "pipeline": {"name": "idle-copy"},
        "input": {"pfs": {"repo": "idle", "glob": "/*"}},
        "transform": {"cmd": ["sh", "-c", "cp -r /pfs/idle/. /pfs/out/"]},
    }
    path = tmp_path / "idle-copy.json"
    path.write_text(json.dumps(spec))
    cluster.cli("create", "pipeline", "-f", str(path))
    monitor = cluster.server.monitor

    async def planner_running() -> bool:
        # The planner has picked the pipeline up once it waits on the pipeline's consumer.
        async with cluster.api() as api:
            info = await api.broker.js.consumer_info(
                subjects.COMMITS_STREAM, subjects.planner_consumer("idle-copy")
            )
        return (info.num_waiting or 0) > 0

    await eventually(planner_running, timeout=30, what="the planner to bind the pipeline")
    first = await asyncio.to_thread(consumer_count, monitor)
    samples = [first]
    deadline = time.monotonic() + WINDOW
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)  # sampling a bounded window: the claim is "does not grow"
        samples.append(await asyncio.to_thread(consumer_count, monitor))
    # One spare: a consumer made and deleted by a listing may be caught at the last sample.
    assert max(samples) <= first + 1, f"consumers grew while idle: {samples}"
