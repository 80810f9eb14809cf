"""The workers chart's samples where no `datumflow up` runs beside the console (a cluster, where
KEDA scales): lag read from JetStream, desired by KEDA's rule, running unknown; on a bare
nats-server with datums queued and no worker to take them."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.messages import DatumTask
from datumflow.console.samples import Sampler
from datumflow.pfs.pipelines import Pipelines
from datumflow.pfs.repos import Repos
from datumflow.spec import load_spec
from datumflow.storage.file import FileStore
from tests.helpers import eventually


@pytest.mark.asyncio
async def test_samples_without_a_local_scaler(broker: Broker, tmp_path: Path) -> None:
    store = FileStore(tmp_path / "objects")
    repos = Repos(broker=broker, store=store)
    pipelines = Pipelines(broker=broker, repos=repos)
    await repos.create_repo("src")
    spec = load_spec(
        '{"pipeline": {"name": "busy"}, "input": {"pfs": {"repo": "src", "glob": "/*"}},'
        ' "transform": {"cmd": ["true"]}, "autoscaling": true,'
        ' "parallelism_spec": {"constant": 4}, "scaling": {"lag_threshold": 3}}'
    )
    await pipelines.create(spec, ack_wait=30)
    for i in range(7):
        task = DatumTask(pipeline="busy", version=1, job="j", datum=f"d{i}", hash="h", inputs=[])
        await broker.publish(subjects.datum("busy"), task, msg_id=f"j:d{i}")

    # A state directory with no status file: the console is not beside a `datumflow up`.
    sampler = Sampler(broker=broker, home=tmp_path / "no-up-here", period=0.1)
    await sampler.sample()
    [sample] = sampler.series("busy")["busy"]
    assert sample["source"] == "console"
    assert sample["lag"] == 7
    assert sample["desired"] == 3  # ceil(7 / 3), within 1..4, as KEDA would ask
    assert sample["running"] is None  # not known without the Kubernetes API
    assert sampler.latest()["busy"]["lag"] == 7

    # A deleted pipeline's samples go with it.
    await pipelines.delete("busy")
    await sampler.sample()
    assert sampler.series() == {}


@pytest.mark.asyncio
async def test_a_record_it_cannot_read_pauses_the_chart_not_the_console(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FileStore(tmp_path / "objects")
    repos = Repos(broker=broker, store=store)
    pipelines = Pipelines(broker=broker, repos=repos)
    await repos.create_repo("src")
    spec = load_spec(
        '{"pipeline": {"name": "fine"}, "input": {"pfs": {"repo": "src", "glob": "/*"}},'
        ' "transform": {"cmd": ["true"]}}'
    )
    await pipelines.create(spec, ack_wait=30)
    kv = await broker.kv(subjects.PIPELINES_BUCKET)
    await kv.put("unreadable", b'{"name": 1}')  # not a PipelineInfo (another version's, say)

    sampler = Sampler(broker=broker, home=tmp_path / "no-up-here", period=0.05)
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="datumflow.console.samples")
    running = asyncio.create_task(sampler.run(stop))
    try:
        await eventually(
            lambda: running.done() or "sampling workers failed" in caplog.text, what="a sample"
        )
        assert not running.done()  # it samples on, rather than ending the console with it
        await kv.delete("unreadable")
        await eventually(lambda: sampler.series().get("fine"), what="samples again")
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=10)
