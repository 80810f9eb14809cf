"""Updating a pipeline over a real JetStream: the planner starts over on the input heads only once
the new version is recorded.

The planner plans a commit event with the version it reads when the event comes. Had the planner
consumer started over first, the old version's loop could take a head's event, find it is the
event of the last job it planned, and drop it: the new version would get no job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.topology import ensure_topology
from datumflow.pfs.pipelines import Pipelines
from datumflow.pfs.repos import Repos
from datumflow.spec import load_spec
from datumflow.storage.file import FileStore


@pytest.mark.asyncio
async def test_the_new_version_is_recorded_before_the_planner_starts_over(
    broker: Broker, tmp_path: Path
) -> None:
    await ensure_topology(broker)
    repos = Repos(broker=broker, store=FileStore(tmp_path / "objects"))
    pipelines = Pipelines(broker=broker, repos=repos)
    await repos.create_repo("in")
    spec = load_spec(
        json.dumps(
            {
                "pipeline": {"name": "copy"},
                "input": {"pfs": {"repo": "in", "glob": "/*"}},
                "transform": {"cmd": ["true"]},
            }
        )
    )
    await pipelines.create(spec, ack_wait=30)
    seen: list[str] = []

    async def record(msg: Msg) -> None:
        seen.append("record" if msg.subject.startswith("$KV.") else "planner consumer")

    planner = subjects.planner_consumer("copy")
    await broker.nc.subscribe(f"$KV.{subjects.PIPELINES_BUCKET}.copy", cb=record)
    # The API subjects a client may create the planner consumer on (with or without a filter).
    creates = f"{subjects.JS_API}.CONSUMER.CREATE.{subjects.COMMITS_STREAM}.{planner}"
    for subject in (
        creates,
        f"{creates}.>",
        f"{subjects.JS_API}.CONSUMER.DURABLE.CREATE.{subjects.COMMITS_STREAM}.{planner}",
    ):
        await broker.nc.subscribe(subject, cb=record)
    await broker.nc.flush()

    info = await pipelines.update(spec, ack_wait=30, reprocess=False)
    await broker.nc.flush()

    assert info.version == 2
    assert seen == ["record", "planner consumer"]
