"""Rounds with two replicas of each control-plane function (`DATUMFLOW_CONTROL_REPLICAS=2`): the
active committer killed or paused, the planner that plans a job killed, mid-job. Each returns the
figures of `verify_exact` (the job SUCCESS, exact, the model's output) and the takeover gap: the
seconds from the fault to the moment the other replica took over.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import msgspec
import nats
from nats.js.errors import KeyNotFoundError

from datumflow.broker import subjects
from datumflow.broker.records import JobInfo, LeaseInfo
from tests.faults.harness import (
    SCRIPT,
    Dataset,
    Figures,
    function_pids,
    make_dataset,
    pipeline_spec,
    sigkill,
)
from tests.faults.scenarios import Rig
from tests.helpers import Cluster, create_pipeline, eventually, put_files

REPLICAS = {"DATUMFLOW_CONTROL_REPLICAS": "2"}


class SlowRig(Rig):
    """The model pipeline, each datum taking `pause` seconds more: a job lasts long enough for a
    takeover to happen in its middle."""

    pause = 0.4

    async def commit(self, datums: int, *, seed: int) -> tuple[Dataset, str, float]:
        data = make_dataset(datums, seed=seed)
        first = self.commits == 0
        started = time.monotonic()
        commit = await put_files(self.cluster, "src", data.files, create=first)
        if first:
            spec = pipeline_spec(self.name, repo="src", marks=self.marks)
            spec["transform"]["cmd"] = ["sh", "-c", f"sleep {self.pause}; {SCRIPT}"]
            create_pipeline(self.cluster, self.tmp_path, spec)
        self.commits += 1
        return data, commit, started


async def lease_holder(cluster: Cluster, function: str) -> LeaseInfo | None:
    nc = await nats.connect(cluster.server.url)
    try:
        kv = await nc.jetstream(timeout=5).key_value(subjects.LEASES_BUCKET)
        try:
            entry = await kv.get(function)
        except KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value, type=LeaseInfo) if entry.value else None
    finally:
        await nc.close()


def log_of(cluster: Cluster, function: str, pid: int) -> Path:
    """The log file of the replica of `function` whose process is `pid`."""
    for path in sorted((cluster.home / "logs").glob(f"{function}-*.log")):
        if f":{pid}/" in path.read_text(errors="replace"):
            return path
    raise AssertionError(f"no {function} log names pid {pid}")


async def _active(cluster: Cluster, function: str) -> LeaseInfo:
    holder = await eventually(
        lambda: lease_holder(cluster, function),
        until=lambda h: h is not None,
        timeout=30,
        what=f"an active {function}",
    )
    assert holder is not None
    assert holder.pid in function_pids(cluster, function), "the holder is not a replica"
    return holder


async def _takeover(cluster: Cluster, function: str, *, gone: int, since: float) -> float:
    """Seconds from `since` until a replica other than `gone` holds the lease."""
    await eventually(
        lambda: lease_holder(cluster, function),
        until=lambda h: h is not None and h.pid != gone,
        timeout=30,
        interval=0.05,
        what=f"another {function} to take over",
    )
    return time.monotonic() - since


class JobWrites:
    """Every write of a job record, as a watch sees it: (when, fence)."""

    def __init__(self, cluster: Cluster, pipeline: str, job: str) -> None:
        self.cluster, self.key = cluster, f"{pipeline}.{job}"
        self.writes: list[tuple[float, int, JobInfo]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> JobWrites:
        self._nc = await nats.connect(self.cluster.server.url)
        kv = await self._nc.jetstream(timeout=5).key_value(subjects.JOBS_BUCKET)
        self._watch = await kv.watch(self.key)

        async def follow() -> None:
            while True:
                entry = await self._watch.updates(timeout=None)  # type: ignore[arg-type]
                if entry is not None and entry.value:
                    job = msgspec.json.decode(entry.value, type=JobInfo)
                    self.writes.append((time.monotonic(), job.fence, job))

        self._task = asyncio.create_task(follow())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._watch.stop()
        await self._nc.close()


async def committer_failover_round(
    rig: Rig, *, datums: int, seed: int, pause: bool, timeout: float = 300
) -> tuple[Figures, float]:
    """SIGKILL (or, with `pause`, SIGSTOP and later SIGCONT) the committer holding the lease once
    a quarter of the job is done. A paused one wakes after the other took over, with a tally that
    misses what the other counted: it must write nothing, every write from the takeover on
    carries the new committer's fence, and the job ends exact."""
    faults: Counter[str] = Counter()
    data, commit, started = await rig.commit(datums, seed=seed)
    await rig.progress(commit, at_least=datums // 4)
    job = await rig.job_for(commit)
    assert job is not None and not job.done, "the job ended before the fault"
    holder = await _active(rig.cluster, "committer")
    async with JobWrites(rig.cluster, rig.name, job.id) as writes:
        hit = time.monotonic()
        if pause:
            os.kill(holder.pid, signal.SIGSTOP)
            faults["active committer SIGSTOP, SIGCONT after the takeover"] += 1
        else:
            sigkill(holder.pid)
            faults["active committer SIGKILL mid-job"] += 1
        try:
            gap = await _takeover(rig.cluster, "committer", gone=holder.pid, since=hit)
            if pause:
                done_then = (await rig.job_for(commit) or job).data_processed
                await rig.progress(commit, at_least=min(done_then + 5, datums))
        finally:
            if pause:
                os.kill(holder.pid, signal.SIGCONT)
        # What an operator sees: the new holder, by `datumflow list lease`.
        shown = json.loads(rig.cluster.cli("list", "lease", "--json").stdout)
        [committer] = [v for v in shown if v["function"] == "committer"]
        assert committer["pid"] != holder.pid
        assert committer["pid"] in function_pids(rig.cluster, "committer")
        if pause:
            log = log_of(rig.cluster, "committer", holder.pid)
            await eventually(
                lambda: "standing by" in log.read_text(errors="replace").split("active")[-1],
                timeout=15,
                what="the woken committer to stand by",
            )
        figures = await rig.finish(
            commit,
            data,
            scenario="two committers, the active one "
            + ("paused past the lease" if pause else "killed"),
            faults=faults,
            started=started,
            timeout=timeout,
        )
    # Told apart by fence, not by when the test saw the takeover: the new holder may end the job
    # (the workers went on without a committer) before the test has noticed that it took over,
    # and a write the old holder sent just before the fault may land after it.
    old = max((fence for when, fence, _ in writes.writes if when < hit), default=0)
    later = [(fence, j) for when, fence, j in writes.writes if when > hit]
    new = max((fence for fence, _ in later), default=0)
    assert new > old, f"no job record write by the committer that took over: {later}"
    after = later[[fence for fence, _ in later].index(new) :]
    fences = [fence for fence, _ in after]
    assert set(fences) == {new}, (
        f"job record writes after the new holder's first carry fences {fences} (before the"
        f" fault: {old}): a committer that lost its lease wrote"
    )
    processed = [j.data_processed for _, j in after]
    assert processed == sorted(processed), f"figures went backwards: {processed}"
    return figures, gap


def _planning(cluster: Cluster, pipeline: str) -> dict[Path, int]:
    return {
        path: path.read_text(errors="replace").count(f"planning job {pipeline}@")
        for path in (cluster.home / "logs").glob("planner-*.log")
    }


async def planner_failover_round(
    rig: Rig, *, datums: int, seed: int, timeout: float = 300
) -> tuple[Figures, float]:
    """SIGKILL the planner that is queueing the datums of a large commit (found by its log line
    "planning job ..."); the other replica, already pulling from the same consumer, gets the event
    after its ack_wait and finishes the plan. The gap: from the kill to the job planned."""
    faults: Counter[str] = Counter()
    if rig.commits == 0:
        # The pipeline first, on an empty repo (no job), so that the big commit's planning is the
        # first, and is watched from its start.
        async with rig.cluster.api() as api:
            await api.repos.create_repo("src")
        spec = pipeline_spec(rig.name, repo="src", marks=rig.marks)
        create_pipeline(rig.cluster, rig.tmp_path, spec)
        rig.commits = 1
    # The kill is sent from this process when the first datum is seen: on a loaded machine it may
    # land only once the planner has finished. Such a round is checked, and another one tried.
    for attempt in range(3):
        data, commit, started, hit = await _kill_the_planning_planner(rig, datums, seed + attempt)
        job = await rig.job_for(commit)
        assert job is not None
        if job.state == "created":
            break
        await rig.finish(
            commit, data, scenario="no fault", faults=Counter(), started=started, timeout=timeout
        )
    else:
        raise AssertionError("the planner finished planning before the kill, three times")
    faults["planning planner SIGKILL mid-planning"] += 1
    job = await eventually(
        lambda: rig.job_for(commit),
        until=lambda j: j is not None and j.state != "created",
        timeout=60,
        interval=0.05,
        what="the other planner to plan the job",
    )
    gap = time.monotonic() - hit
    assert job is not None
    figures = await rig.finish(
        commit,
        data,
        scenario="two planners, the planning one killed",
        faults=faults,
        started=started,
        timeout=timeout,
    )
    return figures, gap


async def _kill_the_planning_planner(
    rig: Rig, datums: int, seed: int
) -> tuple[Dataset, str, float, float]:
    """Commit a dataset; SIGKILL the planner that plans its job when its first datum is queued.
    The data, the commit, when it was made, when the kill was sent."""
    await eventually(
        lambda: len(function_pids(rig.cluster, "planner")) == 2, what="both planners running"
    )
    before = _planning(rig.cluster, rig.name)
    subject = subjects.datum(rig.name)
    nc = await nats.connect(rig.cluster.server.url)
    killed: list[float] = []
    try:
        seen = asyncio.Event()

        async def first(_msg: object) -> None:
            if seen.is_set():
                return
            seen.set()
            now = _planning(rig.cluster, rig.name)
            [log] = [p for p, n in now.items() if n > before.get(p, 0)]
            sigkill(_pid_in(log))
            killed.append(time.monotonic())

        watch = await nc.subscribe(subject, cb=first)
        data, commit, started = await rig.commit(datums, seed=seed)
        await asyncio.wait_for(seen.wait(), timeout=60)
        await watch.unsubscribe()
    finally:
        await nc.close()
    assert killed, "no planner was killed"
    return data, commit, started, killed[0]


def _pid_in(log: Path) -> int:
    """The pid a function's log names when it last started (`datumflow-planner: pid N on HOST`):
    a replica restarted after a kill appends to the same log."""
    pids = [
        int(line.split(": pid ")[1].split()[0])
        for line in log.read_text(errors="replace").splitlines()
        if ": pid " in line
    ]
    assert pids, f"{log} names no pid"
    return pids[-1]
