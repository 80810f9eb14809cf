"""The local scaler's own decisions, without processes: which worker to stop, how long a worker
may drain, the state it reports, the busy marker it reads, and how the CLI reads its status."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from datumflow.broker.records import PipelineInfo
from datumflow.cli.pps_commands import _pipeline_view, _status
from datumflow.functions.worker.pod_cost import BusyFile, NoPodDeletionCost, worker_marker
from datumflow.runtime.pipeline_workers import PipelineWorkers, choose_to_stop, worker_grace
from datumflow.runtime.supervisor import Supervisor
from datumflow.settings import Settings
from datumflow.spec import PipelineSpec, load_spec


def make_spec(**fields: Any) -> PipelineSpec:
    doc = {
        "pipeline": {"name": "edges"},
        "input": {"pfs": {"repo": "images", "glob": "/*"}},
        "transform": {"cmd": ["true"]},
        **fields,
    }
    return load_spec(json.dumps(doc))


def make_info(version: int = 1, **fields: Any) -> PipelineInfo:
    return PipelineInfo(
        name="edges", version=version, spec=make_spec(**fields), salt="s", created=1, updated=1
    )


class FakeChild:
    """What the supervisor's scale-down looks at and does to a worker process."""

    def __init__(self, index: int, *, busy: bool = False, alive: bool = True) -> None:
        self.index = index
        self.is_busy = busy
        self.alive = alive
        self.terminated = False
        self.kill_at: float | None = None

    def terminate(self, *, kill_at: float | None = None) -> None:
        self.terminated, self.kill_at = True, kill_at

    def reap(self) -> bool:
        return self.alive

    async def keep_alive(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"w{self.index}{'*' if self.is_busy else ''}"


# --- which worker goes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("busy", "count", "stopped"),
    [
        ([False, False, False], 1, [2]),  # all idle: the newest
        ([False, False, False], 2, [2, 1]),
        ([False, True, True], 1, [0]),  # the idle one, even the oldest
        ([True, False, True], 2, [1, 2]),  # the idle one, then the newest busy one
        ([True, True, True], 1, [2]),
        ([False, True], 0, []),
        ([False, True], 5, [0, 1]),
    ],
)
def test_choose_to_stop_takes_idle_workers_first(
    busy: list[bool], count: int, stopped: list[int]
) -> None:
    workers = [FakeChild(i, busy=b) for i, b in enumerate(busy)]
    chosen = choose_to_stop(workers, count, busy=lambda w: w.is_busy)
    assert [w.index for w in chosen] == stopped


@pytest.mark.asyncio
async def test_scale_down_terminates_idle_workers_with_a_kill_deadline(tmp_path: Path) -> None:
    supervisor = Supervisor(settings=Settings(home=str(tmp_path), grace=4), embedded=False)
    supervisor._busy = lambda child: child.is_busy  # type: ignore[assignment,method-assign]
    pw = PipelineWorkers(make_info(parallelism_spec={"constant": 3}), grace_cap=4, previous=None)
    busy, idle, newest = FakeChild(0, busy=True), FakeChild(1), FakeChild(2, busy=True)
    pw.workers = [busy, idle, newest]  # type: ignore[list-item]
    before = time.monotonic()
    await supervisor._scale(pw, 1)
    assert pw.workers == [busy]
    assert pw.draining == [idle, newest]
    assert idle.terminated and newest.terminated and not busy.terminated
    # Killed only after the drain plus the shutdown margin, as the kubelet would.
    assert idle.kill_at is not None and idle.kill_at >= before + 4 + 15

    idle.alive = False  # it exited; the busy one is still finishing its datum
    await supervisor._scale(pw, 1)
    assert pw.draining == [newest]
    assert pw.status()["draining"] == 1


# --- drain time ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datum_timeout", "cap", "grace"),
    [
        ("", 20.0, 20.0),  # the local setting caps the 30 s default
        ("", 60.0, 30.0),  # ... but never above the drain a pod gets
        ("5s", 20.0, 5.0),  # a datum ends within its timeout anyway
        ("2h", 20.0, 20.0),
        ("", 1.0, 1.0),
    ],
)
def test_worker_grace(datum_timeout: str, cap: float, grace: float) -> None:
    assert worker_grace(make_spec(datum_timeout=datum_timeout), cap=cap) == grace


# --- state and status ----------------------------------------------------------------------------


def test_states() -> None:
    auto = PipelineWorkers(
        make_info(autoscaling=True, parallelism_spec={"constant": 3}), grace_cap=20, previous=None
    )
    assert auto.state == "standby" and auto.status()["max_workers"] == 3
    auto.desired = 2
    assert auto.state == "running"

    fixed = PipelineWorkers(
        make_info(parallelism_spec={"constant": 2}), grace_cap=20, previous=None
    )
    assert fixed.state == "running" and fixed.status()["autoscaling"] is False

    broken = PipelineWorkers(make_info(scaling={"lag_threshold": 0}), grace_cap=20, previous=None)
    assert broken.state == "failure" and broken.scaler is None
    assert "scaling.lag_threshold" in broken.status()["reason"]


def test_a_new_version_keeps_the_workers_and_the_scalers_memory() -> None:
    fields: dict[str, Any] = {"autoscaling": True, "parallelism_spec": {"constant": 3}}
    old = PipelineWorkers(make_info(**fields), grace_cap=20, previous=None)
    assert old.scaler is not None
    assert old.scaler.desired(5, now=100.0) == 3
    old.workers = [FakeChild(0)]  # type: ignore[list-item]
    old.desired = 3

    same_scaling = PipelineWorkers(make_info(2, **fields), grace_cap=20, previous=old)
    assert same_scaling.workers is old.workers and same_scaling.scaler is old.scaler
    # Still inside the cooldown that began with version 1's lag: no drop to zero.
    assert same_scaling.scaler.desired(0, now=101.0) >= 1

    new_scaling = PipelineWorkers(
        make_info(3, **fields, scaling={"cooldown_period": 1}), grace_cap=20, previous=old
    )
    assert new_scaling.workers is old.workers and new_scaling.scaler is not old.scaler


def test_free_index_reuses_the_lowest_number() -> None:
    pw = PipelineWorkers(make_info(), grace_cap=20, previous=None)
    pw.workers = [FakeChild(0), FakeChild(2)]  # type: ignore[list-item]
    pw.draining = [FakeChild(1)]  # type: ignore[list-item]
    assert pw.free_index() == 3
    pw.draining = []
    assert pw.free_index() == 1


# --- busy or idle --------------------------------------------------------------------------------


class _Process:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None


@pytest.mark.asyncio
async def test_busy_file_marker(tmp_path: Path) -> None:
    path = tmp_path / "run" / "worker-edges-0.busy"
    path.parent.mkdir()
    marker = worker_marker(pod_name=None, namespace=None, busy_file=str(path))
    assert isinstance(marker, BusyFile)
    await marker.busy()
    assert path.exists()
    await marker.idle()
    await marker.idle()
    assert not path.exists()
    assert isinstance(worker_marker(pod_name="", namespace="", busy_file=""), NoPodDeletionCost)


def test_supervisor_tells_busy_workers(tmp_path: Path) -> None:
    supervisor = Supervisor(settings=Settings(home=str(tmp_path)), embedded=False)
    child = supervisor._child("worker-edges-0", "worker")
    child.busy_file = tmp_path / "worker-edges-0.busy"
    child.process = _Process(4242)  # type: ignore[assignment]
    assert not supervisor._busy(child)
    marker = BusyFile(child.busy_file)
    asyncio.run(marker.busy())
    assert supervisor._busy(child)
    asyncio.run(marker.idle())
    assert not supervisor._busy(child)

    child.process.returncode = 0  # type: ignore[union-attr]
    child.busy_file.touch()
    assert not supervisor._busy(child), "a dead worker holds nothing"
    assert not child.reap() and not child.busy_file.exists(), "its marker is cleared"


# --- the CLI's view of status.json ---------------------------------------------------------------


def test_pipeline_view_reads_fresh_status(tmp_path: Path) -> None:
    info = make_info(autoscaling=True, parallelism_spec={"constant": 3})
    entry = {
        "state": "running",
        "workers": 2,
        "desired": 3,
        "lag": 7,
        "max_workers": 3,
        "updated": time.time(),
    }
    (tmp_path / "status.json").write_text(json.dumps({"edges": entry}))
    view = _pipeline_view(info, _status(str(tmp_path)), None)
    assert {k: view[k] for k in ("state", "workers", "desired", "lag", "max_workers")} == {
        "state": "running",
        "workers": 2,
        "desired": 3,
        "lag": 7,
        "max_workers": 3,
    }

    # Left behind by a supervisor that is gone: not believed.
    entry["updated"] = time.time() - 60
    (tmp_path / "status.json").write_text(json.dumps({"edges": entry}))
    view = _pipeline_view(info, _status(str(tmp_path)), None)
    assert (view["state"], view["workers"], view["lag"]) == ("standby", 0, None)

    (tmp_path / "status.json").write_text("not json")
    assert _status(str(tmp_path)) == {}
    fixed = _pipeline_view(make_info(), {}, None)
    assert fixed["state"] == "running"


def test_the_embedded_broker_leaves_cores_to_the_workers(nats_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from datumflow.runtime.embedded import server_environment

    assert nats_server.process is not None
    environ = Path(f"/proc/{nats_server.process.pid}/environ").read_bytes().split(b"\0")
    expected = os.environ.get("GOMAXPROCS") or str(max((os.cpu_count() or 1) // 2, 1))
    assert f"GOMAXPROCS={expected}".encode() in environ
    assert server_environment({}, 2)["GOMAXPROCS"] == "1"
    assert server_environment({}, 16)["GOMAXPROCS"] == "8"
    assert server_environment({"GOMAXPROCS": "3"}, 16)["GOMAXPROCS"] == "3"  # the user's word
