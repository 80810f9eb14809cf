"""Running the scenarios through datumflow: a repo of N files, a pipeline whose in-process
function does the work, the clock from the commit to the job's end."""

from __future__ import annotations

import asyncio
import time

from bench.cluster import Cluster, memory_kb, wait_job, wait_workers
from bench.scenarios import Measure, Scenario
from datumflow.broker.messages import FileRef


async def _commit(cluster: Cluster, repo: str, files: int) -> float:
    """Commit `files` files to a new repo; returns the time the commit call started."""
    async with cluster.api() as api:
        # One object for every file: a datum's identity is its path, and the bench measures
        # datums, not the disk.
        key, size = await api.store.put_bytes(b"datum\n")
        refs = [FileRef(path=f"/f{i:07d}", size=size, hash=key) for i in range(files)]
        started = time.time()
        await api.repos.commit_files(repo, "master", puts=refs)
        return started


async def _create_repo(cluster: Cluster, repo: str) -> None:
    async with cluster.api() as api:
        await api.repos.create_repo(repo)


async def run_scenario(cluster: Cluster, scenario: Scenario) -> Measure:
    name, repo = scenario.key, f"{scenario.key}-in"
    await _create_repo(cluster, repo)
    cluster.create_pipeline(
        {
            "pipeline": {"name": name},
            "input": {"pfs": {"repo": repo, "glob": "/*"}},
            "transform": {"function": f"bench.work:df_{scenario.kind}"},
            "parallelism_spec": {"constant": scenario.workers},
        }
    )
    async with cluster.api() as api:
        await wait_workers(api, name, scenario.workers)
    started = await _commit(cluster, repo, scenario.datums)
    async with cluster.api() as api:
        job = await wait_job(api, name)
    ok = job.state == "success" and job.data_processed == scenario.datums
    measure = Measure(
        system="datumflow",
        scenario=name,
        datums=scenario.datums,
        seconds=job.finished - started,
        ok=ok,
        note="" if ok else f"job {job.state}: {job.data_processed}/{job.data_total} {job.reason}",
        extra={"planned_after": job.started - started},
    )
    cluster.cli("delete", "pipeline", name)
    await _until_gone(cluster, name)
    return measure


async def _until_gone(cluster: Cluster, pipeline: str, timeout: float = 60) -> None:
    """The deleted pipeline's workers have exited: they no longer take CPU from the next one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not cluster.pids("worker", pipeline):
            return
        await asyncio.sleep(0.1)


async def run_planning(cluster: Cluster, files: int, *, name: str) -> Measure:
    """Plan one commit of `files` files with glob /*: a datum per file, queued, no worker running
    (the pipeline stays in standby: its activation threshold is above any lag)."""
    repo = f"{name}-in"
    await _create_repo(cluster, repo)
    cluster.create_pipeline(
        {
            "pipeline": {"name": name},
            "input": {"pfs": {"repo": repo, "glob": "/*"}},
            "transform": {"function": "bench.work:df_noop"},
            "autoscaling": True,
            "scaling": {"activation_lag_threshold": 2_000_000_000},
        }
    )
    [planner] = cluster.pids("planner")
    before = memory_kb(planner, "VmRSS")
    async with cluster.api() as api:
        key, size = await api.store.put_bytes(b"datum\n")
        refs = [FileRef(path=f"/f{i:07d}", size=size, hash=key) for i in range(files)]
        await api.repos.commit_files(repo, "master", puts=refs)
        del refs
        # The commit event is out: from here on it is the planner's work.
        started = time.time()
        job = await wait_job(api, name, planned_only=True, timeout=3600)
    peak = memory_kb(planner, "VmHWM")
    ok = job.data_total == files
    measure = Measure(
        system="datumflow",
        scenario=f"plan-{files}",
        datums=job.data_total,
        seconds=job.started - started,
        ok=ok,
        note="" if ok else f"planned {job.data_total} of {files}",
        peak_mb=peak / 1024,
        extra={"rss_before_mb": before / 1024},
    )
    cluster.cli("delete", "pipeline", name)
    return measure
