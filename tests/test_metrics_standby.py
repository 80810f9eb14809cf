"""A committer that stops (its lease lost, or shut down) stops showing the live gauges it set: in
a cluster each control-plane pod serves its own /metrics, and the dashboard sums the running job's
figures over pods, so a standby's last values would be counted beside the active one's."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from datumflow import metrics
from datumflow.broker.connection import Broker
from datumflow.broker.messages import JobPlanned
from datumflow.functions.committer import Committer
from datumflow.functions.job_metrics import job_progress
from datumflow.functions.tally import Tally
from datumflow.settings import Settings
from datumflow.storage.file import FileStore


@pytest.fixture
def recorded() -> Iterator[metrics.Metrics]:
    installed = metrics.install(Settings(metrics="127.0.0.1:0"))
    assert installed is not None
    try:
        yield installed
    finally:
        metrics.install(Settings(metrics="off"))


def _series(gauge: object) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for family in gauge.collect() for s in family.samples]  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_a_committer_that_stops_shows_no_running_job_or_backlog(
    recorded: metrics.Metrics, broker: Broker, tmp_path: Path
) -> None:
    committer = Committer(broker=broker, store=FileStore(tmp_path / "objects"))
    stop = asyncio.Event()
    running = asyncio.create_task(committer.run(stop))
    tally = Tally()
    tally.add(JobPlanned(pipeline="p", job="j", data_total=10))
    job_progress(pipeline="p", tally=tally)
    recorded.pending.labels(pipeline="p").set(7)
    assert _series(recorded.running_datums) and _series(recorded.pending)
    stop.set()
    await asyncio.wait_for(running, timeout=30)
    assert _series(recorded.running_datums) == []
    assert _series(recorded.pending) == []
