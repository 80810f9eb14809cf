"""KV buckets read without consumers piling up: an idle `datumflow up` leaves none behind (listing
a bucket, the supervisor's tick and the planner's loop, happens many times a second), and the
controller's pipelines watch, reopened again and again, reports each change once."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import msgspec
import pytest

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.kv import Records
from datumflow.broker.records import PipelineInfo
from datumflow.deploy.watch import pipeline_events
from datumflow.spec import load_spec
from tests.helpers import Cluster, create_pipeline, eventually

pytestmark = pytest.mark.asyncio

WINDOW = 8.0
"""Seconds an idle cluster is watched: the old listing left ~6 consumers a second behind, and
each of `up`'s loops (pipelines listed every 2 s, a constant pipeline's lag read every 5 s) runs
in it at least once."""


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
    create_pipeline(cluster, tmp_path, spec)
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


async def test_pipeline_events_report_each_change_once_across_resyncs(broker: Broker) -> None:
    """The controller's watch (datumflow.deploy.watch over broker.kv.watch): a create, an update
    and a delete each come once, though the watch is reopened every half second."""
    records = Records(broker, bucket=subjects.PIPELINES_BUCKET, type=PipelineInfo)
    spec = load_spec(
        json.dumps(
            {
                "pipeline": {"name": "w"},
                "transform": {"cmd": ["true"]},
                "input": {"pfs": {"repo": "r", "glob": "/*"}},
            }
        ).encode()
    )
    info = PipelineInfo(name="w", version=1, spec=spec, salt="s", created=0.0, updated=0.0)
    stop = asyncio.Event()
    events: asyncio.Queue[tuple[str, object]] = asyncio.Queue()

    async def watch() -> None:
        async for event in pipeline_events(broker, stop=stop, resync_interval=0.5):
            await events.put(event)

    task = asyncio.create_task(watch())
    try:
        await records.put("w", info)
        assert await asyncio.wait_for(events.get(), 10) == ("w", spec)
        changed = msgspec.structs.replace(spec, datum_tries=7)
        await records.put("w", msgspec.structs.replace(info, version=2, spec=changed))
        assert await asyncio.wait_for(events.get(), 10) == ("w", changed)
        await records.delete("w")
        assert await asyncio.wait_for(events.get(), 10) == ("w", None)
        # A few resyncs later, nothing is reported again.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(events.get(), 2.0)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
