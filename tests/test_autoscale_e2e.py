"""Autoscaling on one machine, end to end: real `datumflow up`, real worker processes, real lag.

An autoscaled pipeline waits in standby with no worker process, gets up to its parallelism under
load, and goes back to zero after its cooldown; a pipeline without autoscaling keeps its workers.
A worker told to stop while busy hands its datum back at once instead of holding it for ack_wait;
a scale-down stops the idle workers and leaves the busy one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from datumflow.broker import subjects
from datumflow.scaling import lag_from_jsz
from tests.helpers import (
    HOST_PID,
    Cluster,
    create_pipeline,
    eventually,
    output_files,
    put_files,
    wait_job_done,
)

pytestmark = pytest.mark.asyncio

COOLDOWN = 2.0
POLL = 0.5


def worker_processes(cluster: Cluster, pipeline: str) -> list[int]:
    """The pipeline's worker processes, without their children caught between fork and exec
    (which still show the worker's command line), nor processes gone since they were listed (a
    child that ended before its parent could be read would otherwise count)."""
    pids = set(cluster.worker_pids(pipeline))
    return sorted(pid for pid in pids if _parent(pid) not in pids | {0})


def function_running(cluster: Cluster, function: str) -> bool:
    """Whether `datumflow <function>` runs as a child of this cluster's supervisor."""
    assert cluster.process is not None
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _parent(int(proc.name)) == cluster.process.pid:
            with contextlib.suppress(OSError):
                if function.encode() in (proc / "cmdline").read_bytes().split(b"\0"):
                    return True
    return False


def _parent(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class Sample:
    at: float
    """time.monotonic() of the sample."""
    processes: int
    """Worker processes of the pipeline, counted in /proc."""
    status: dict[str, Any]
    """The supervisor's status.json entry for the pipeline ({} before it has one)."""
    lag: int
    """The consumer's lag read from /jsz now, as KEDA and the supervisor read it."""


class Watch:
    """Samples a pipeline's worker processes and supervisor status every 20 ms, in the background."""

    def __init__(self, cluster: Cluster, pipeline: str) -> None:
        self.cluster = cluster
        self.pipeline = pipeline
        self.samples: list[Sample] = []

    def sample(self) -> Sample:
        try:
            status = json.loads((self.cluster.home / "status.json").read_text())
        except (OSError, ValueError):
            status = {}
        url = f"http://{self.cluster.server.monitor}/jsz?acc=$G&config=true&consumers=true"
        with urllib.request.urlopen(url, timeout=5) as resp:
            jsz = json.loads(resp.read())
        lag = lag_from_jsz(
            jsz, stream=subjects.DATUMS_STREAM, consumer=subjects.worker_consumer(self.pipeline)
        )
        return Sample(
            at=time.monotonic(),
            processes=len(worker_processes(self.cluster, self.pipeline)),
            status=status.get(self.pipeline, {}),
            lag=lag or 0,
        )

    async def run(self) -> None:
        while True:
            self.samples.append(await asyncio.to_thread(self.sample))
            await asyncio.sleep(0.02)

    async def until(self, check: Callable[[Sample], bool], *, timeout: float, what: str) -> Sample:
        """The first sample, from now on, for which `check` holds."""
        start = len(self.samples)

        async def found() -> Sample | None:
            return next((s for s in self.samples[start:] if check(s)), None)

        return await eventually(found, timeout=timeout, interval=0.02, what=what)


@contextlib.asynccontextmanager
async def watching(cluster: Cluster, pipeline: str) -> AsyncIterator[Watch]:
    watch = Watch(cluster, pipeline)
    task = asyncio.create_task(watch.run())
    try:
        yield watch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def pipeline_views(cluster: Cluster) -> dict[str, dict[str, Any]]:
    views = json.loads(cluster.cli("list", "pipeline", "--json").stdout)
    return {v["name"]: v for v in views}


async def test_autoscaled_pipeline_goes_from_zero_to_parallelism_and_back(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    cluster = make_cluster(DATUMFLOW_ACK_WAIT="10")
    for function in ("planner", "committer", "ingest"):
        await eventually(
            lambda f=function: asyncio.to_thread(function_running, cluster, f),
            what=f"datumflow {function} under the supervisor",
        )
    async with cluster.api() as api:
        await api.repos.create_repo("nums")
        await api.repos.create_repo("quiet")
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "auto"},
            "input": {"pfs": {"repo": "nums", "glob": "/*"}},
            "transform": {"cmd": ["sh", "-c", "sleep 0.5; cp /pfs/nums/* /pfs/out/"]},
            "parallelism_spec": {"constant": 3},
            "autoscaling": True,
            "scaling": {"cooldown_period": COOLDOWN, "polling_interval": POLL},
        },
    )
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "fixed"},
            "input": {"pfs": {"repo": "quiet", "glob": "/*"}},
            "transform": {"cmd": ["sh", "-c", "cp /pfs/quiet/* /pfs/out/"]},
            "parallelism_spec": {"constant": 2},
        },
    )
    async with watching(cluster, "auto") as watch:
        # Standby: the supervisor has seen the pipeline, and over several polls of its lag it
        # has started no worker.
        first = await watch.until(lambda s: bool(s.status), timeout=30, what="auto in status")
        await watch.until(
            lambda s: s.at > first.at + 4 * POLL, timeout=30, what="four polls of auto's lag"
        )
        idle = [s for s in watch.samples if s.at >= first.at]
        assert all(s.processes == 0 and s.status["workers"] == 0 for s in idle), idle[-1]
        assert idle[-1].status["state"] == "standby"
        assert len(await asyncio.to_thread(worker_processes, cluster, "fixed")) == 2

        views = await asyncio.to_thread(pipeline_views, cluster)
        assert (
            views["auto"].items()
            >= {
                "state": "standby",
                "autoscaling": True,
                "workers": 0,
                "desired": 0,
                "lag": 0,
                "max_workers": 3,
            }.items()
        )
        assert (
            views["fixed"].items()
            >= {
                "state": "running",
                "autoscaling": False,
                "workers": 2,
                "desired": 2,
                "max_workers": 2,
            }.items()
        )

        # 30 slow datums: lag 30, three workers (never more), until the job is done.
        files = {f"/n{i:02d}": f"{i}\n".encode() for i in range(30)}
        await put_files(cluster, "nums", files, create=False)
        lagging = await watch.until(lambda s: s.lag > 0, timeout=30, what="lag")
        started = await watch.until(lambda s: s.processes > 0, timeout=30, what="a worker")
        await watch.until(lambda s: s.processes == 3, timeout=30, what="three workers")
        busy = await asyncio.to_thread(pipeline_views, cluster)
        assert busy["auto"]["state"] == "running"
        assert busy["auto"]["workers"] >= 1 and busy["auto"]["desired"] >= 1

        [job] = await wait_job_done(cluster, "auto", timeout=120)
        assert job.state == "success", job.reason
        assert (job.data_total, job.data_processed) == (30, 30)
        assert await output_files(cluster, "auto") == files

        # Back to standby after the cooldown, counted from the last time there was lag.
        zero = await watch.until(
            lambda s: s.processes == 0 and s.status.get("state") == "standby",
            timeout=COOLDOWN + 30,
            what="zero workers again",
        )
        last_lag = max(s.at for s in watch.samples if s.lag > 0)
        assert zero.at - last_lag >= COOLDOWN - POLL - 0.25, "scaled down before the cooldown"
        most = max(watch.samples, key=lambda s: s.processes)
        assert most.processes == 3, most
        assert max(s.status.get("workers", 0) for s in watch.samples) == 3

    print(
        f"\nfirst lag -> first worker process: {started.at - lagging.at:.2f}s;"
        f" last lag -> zero workers: {zero.at - last_lag:.2f}s (cooldown {COOLDOWN:g}s)"
    )
    views = await asyncio.to_thread(pipeline_views, cluster)
    assert views["auto"]["state"] == "standby" and views["auto"]["workers"] == 0
    assert views["auto"]["last_job_state"] == "success"


async def test_sigterm_hands_a_busy_workers_datum_to_another_at_once(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    # A datum held by a worker that dies silently comes back after ack_wait (60 s here). One held
    # by a worker that is told to stop comes back after the grace period (1 s).
    cluster = make_cluster(DATUMFLOW_ACK_WAIT="60", DATUMFLOW_GRACE="1")
    marks = tmp_path / "marks"
    marks.mkdir()
    await put_files(cluster, "in", {"/only": b"only\n"})
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "handoff"},
            "input": {"pfs": {"repo": "in", "glob": "/*"}},
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    # The first attempt takes far longer than the test; the next one is quick.
                    # $ppid is the worker process that runs the datum, as the test sees it.
                    f"{HOST_PID}; "
                    'echo $ppid >> "$MARKS/attempts";'
                    ' if [ ! -e "$MARKS/first" ]; then touch "$MARKS/first"; sleep 120; fi;'
                    " cp /pfs/in/* /pfs/out/",
                ],
                "env": {"MARKS": str(marks)},
            },
            "parallelism_spec": {"constant": 2},
        },
    )
    attempts = marks / "attempts"
    await eventually(
        lambda: asyncio.to_thread(attempts.exists), timeout=30, what="the first attempt"
    )
    [holder] = [int(line) for line in attempts.read_text().split()]
    workers = await eventually(
        lambda: asyncio.to_thread(lambda: sorted(worker_processes(cluster, "handoff"))),
        what="worker processes",
    )
    assert holder in workers
    await eventually(
        lambda: asyncio.to_thread(lambda: len(worker_processes(cluster, "handoff")) == 2),
        what="both workers",
    )
    others = set(worker_processes(cluster, "handoff")) - {holder}

    signalled = time.monotonic()
    os.kill(holder, signal.SIGTERM)
    [job] = await wait_job_done(cluster, "handoff", timeout=50)
    elapsed = time.monotonic() - signalled

    assert job.state == "success", job.reason
    assert await output_files(cluster, "handoff") == {"/only": b"only\n"}
    first, second = [int(line) for line in attempts.read_text().split()]
    assert first == holder
    assert second in others, "the datum went to the worker that was already waiting"
    # 1 s of grace, the nak, the other worker's fetch, a quick datum, the commit: seconds,
    # where waiting out ack_wait would take 60.
    assert elapsed < 15, f"the datum took {elapsed:.1f}s to complete after SIGTERM"
    print(f"\nSIGTERM -> datum done on another worker: {elapsed:.2f}s (ack_wait 60s, grace 1s)")


# The supervisor names a busy file for each worker (DATUMFLOW_BUSY_FILE) and stops idle workers
# first; the worker keeps the file while it holds a datum.
async def test_scale_down_stops_idle_workers_and_leaves_the_busy_one(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    # Three datums, three workers; two datums are quick, one is long. When the lag drops to the
    # long datum alone, the scaler asks for one worker: the two idle ones must go, and the one
    # holding the long datum must stay and finish it, on its first and only attempt.
    cluster = make_cluster(DATUMFLOW_ACK_WAIT="60", DATUMFLOW_GRACE="1")
    marks = tmp_path / "marks"
    marks.mkdir()
    go = tmp_path / "go"
    await put_files(cluster, "parts", {"/long": b"long\n", "/quick1": b"1\n", "/quick2": b"2\n"})
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "mixed"},
            "input": {"pfs": {"repo": "parts", "glob": "/*"}},
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    f"{HOST_PID}; "
                    'for f in /pfs/parts/*; do n=$(basename "$f"); echo $ppid >> "$MARKS/$n";'
                    ' case $n in long) while [ ! -e "$GO" ]; do sleep 0.05; done;; esac;'
                    ' cp "$f" /pfs/out/; done',
                ],
                "env": {"MARKS": str(marks), "GO": str(go)},
            },
            "parallelism_spec": {"constant": 3},
            "autoscaling": True,
            "scaling": {"cooldown_period": 30, "polling_interval": POLL},
            # Datum sets of one: each worker takes one datum.
            "datum_set_spec": {"number": 1},
        },
    )
    async with watching(cluster, "mixed") as watch:
        await watch.until(lambda s: s.processes == 3, timeout=30, what="three workers")
        long_mark = marks / "long"
        await eventually(lambda: asyncio.to_thread(long_mark.exists), what="the long datum")
        # Down to the one worker the remaining lag asks for (after the scale-down window).
        await watch.until(
            lambda s: s.status.get("desired") == 1 and s.processes == 1,
            timeout=60,
            what="one worker left",
        )
        [holder] = [int(x) for x in long_mark.read_text().split()]
        assert await asyncio.to_thread(worker_processes, cluster, "mixed") == [holder]
        go.touch()
        [job] = await wait_job_done(cluster, "mixed", timeout=60)
    assert job.state == "success", job.reason
    assert len(long_mark.read_text().split()) == 1, "the long datum ran once"
