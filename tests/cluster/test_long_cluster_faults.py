"""The long form of the multi-host fault tests, run by hand: one deployment (tests/cluster/
deployment.py, with a second control plane on cp2 as in test_control_plane_host.py), job after
job of a few hundred datums, each job hit by one kind of fault again and
again while it runs, the kinds in turn; hundreds of faults in all. Every job must end SUCCESS with
exact figures and the output of a fault-free run.

Skipped unless DATUMFLOW_LONG_FAULTS=1. DATUMFLOW_LONG_ROUNDS scales the jobs (default 1.0: 32,
four of each kind, each round opening with a fault-free job that the others' datums/s are compared
with); DATUMFLOW_LONG_DATUMS (default 400) and DATUMFLOW_LONG_PER_JOB (default 6) size each job
and the faults it may take; DATUMFLOW_LONG_MINUTES, when set, starts no job and injects no fault
after that many minutes (the job running then ends within its wait's deadline, and is verified). Each job appends its
figures to $DATUMFLOW_FAULT_REPORT (summed up by tests.faults.summarize), and each fault its
timings to $DATUMFLOW_FAULT_REPORT.faults:

    DATUMFLOW_LONG_FAULTS=1 DATUMFLOW_FAULT_REPORT=/tmp/cluster.jsonl nice -n 10 \\
        .venv/bin/python -m pytest tests/cluster/test_long_cluster_faults.py -p no:xdist -s
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import pytest

from tests.cluster import faults
from tests.cluster.deployment import ACK_WAIT, CONTROL, Deployment, Job, Workload
from tests.cluster.faults import Fault
from tests.cluster.timings import Timed
from tests.faults.harness import REPORT_ENV
from tests.helpers import cancel_requested, eventually

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.slow,
    pytest.mark.timeout(0),
    pytest.mark.skipif(
        os.environ.get("DATUMFLOW_LONG_FAULTS") != "1",
        reason="the long fault form runs by hand: DATUMFLOW_LONG_FAULTS=1",
    ),
]

HOSTS = ["n1", "n2", "n3", "s3", *CONTROL, "w1"]
DATUMS = int(os.environ.get("DATUMFLOW_LONG_DATUMS", "400"))
"""Datums a job: more datums, a longer job, more faults to each job's start and verification."""
SLEEP = 0.2
"""Seconds of user code per datum: a job runs for a minute or more, through several faults."""
PER_JOB = int(os.environ.get("DATUMFLOW_LONG_PER_JOB", "6"))
"""Faults of one kind injected into one job at most (fewer if it ends first)."""
SAMPLE_TIMEOUT = 30.0
"""Seconds one reading of a job's progress may take (it opens a client through any fault)."""


class Progress:
    """When the job's count of datums processed went up, sampled every 0.1 s.

    `stop` does not rest on cancelling the sampler alone: Python 3.11's asyncio.wait_for swallows
    a cancel that lands once its call is done (see tests.helpers.cancel_requested), and a sampler
    that missed it ran on forever, with the test waiting for it. The sampler also ends on a flag,
    each sample has a deadline, and `stop` waits for it a bounded time."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.times: list[float] = []
        self.stopping = False
        self.task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        last = -1
        while not self.stopping and not cancel_requested():
            with contextlib.suppress(Exception):  # the broker may be in the midst of a fault
                n = await asyncio.wait_for(self.job.processed(), SAMPLE_TIMEOUT)
                if n != last:
                    if last >= 0:
                        self.times.append(time.monotonic())
                    last = n
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self.stopping = True
        self.task.cancel()
        await asyncio.wait({self.task}, timeout=SAMPLE_TIMEOUT + 5)
        assert self.task.done(), "the progress sampler did not stop"

    def after(self, fault: Fault, recovered: float, scenario: str) -> Timed:
        later = [t for t in self.times if t > fault.at]
        first = later[0] - fault.at if later else -1.0
        marks = [fault.at, *later]
        gaps = [b - a for a, b in itertools.pairwise(marks) if a <= recovered]
        return Timed(
            fault=fault,
            scenario=scenario,
            first_progress=round(first, 2),
            stall=round(max(gaps, default=-1.0), 2),
            recovered=round(recovered - fault.at, 2),
        )


Inject = Callable[[Deployment, Workload, random.Random], Awaitable[list[Fault]]]


async def _stream_leader(d: Deployment, w: Workload, rng: random.Random) -> list[Fault]:
    return [await faults.kill_stream_leader(d)]


async def _consumer_leader(d: Deployment, w: Workload, rng: random.Random) -> list[Fault]:
    fault = await faults.kill_consumer_leader(d, w.pipeline)
    await faults.rejoin(d, d.nats.node(fault.node))
    return [fault]


async def _any_server(d: Deployment, w: Workload, rng: random.Random) -> list[Fault]:
    return [await faults.kill_any_server(d, rng.choice(d.nats.nodes).name)]


async def _partition(d: Deployment, w: Workload, rng: random.Random) -> list[Fault]:
    fault = await faults.partition_stream_leader(d, seconds=rng.choice([10, 20]))
    await faults.rejoin(d, d.nats.node(fault.node))
    return [fault]


async def _rolling(d: Deployment, w: Workload, rng: random.Random) -> list[Fault]:
    return await faults.rolling_restart(d)


async def _worker_host(d: Deployment, w: Workload, rng: random.Random) -> list[Fault]:
    """w1 cut off for longer than ack_wait, then back (its late results change nothing)."""
    w1 = d.lab["w1"]
    cut = time.monotonic()
    w1.cut()
    try:
        await asyncio.sleep(float(ACK_WAIT) + rng.uniform(2, 8))
    finally:
        w1.heal()
    return [Fault(kind="worker host link cut past ack_wait", node="w1", at=cut)]


async def _control_host(d: Deployment, w: Workload, rng: random.Random) -> list[Fault]:
    return [await faults.lose_active_control_host(d, w)]


async def _none(d: Deployment, w: Workload, rng: random.Random) -> list[Fault]:
    return []


BASELINE = "no fault"
"""A job left alone, once a round: the datums/s the faults' jobs are compared with."""

KINDS: list[tuple[str, Inject]] = [
    (BASELINE, _none),
    ("active control-plane host lost", _control_host),
    ("stream leader SIGKILL", _stream_leader),
    ("consumer leader SIGKILL", _consumer_leader),
    ("any server SIGKILL", _any_server),
    ("stream leader host partitioned", _partition),
    ("rolling restart", _rolling),
    ("worker host cut past ack_wait", _worker_host),
]


def _append(path: str, record: msgspec.Struct) -> None:
    with open(path, "ab") as f:
        f.write(msgspec.json.encode(record) + b"\n")


async def test_long_cluster_faults(deployment: Deployment, tmp_path: Path) -> None:
    d = deployment
    jobs = max(1, round(4 * len(KINDS) * float(os.environ.get("DATUMFLOW_LONG_ROUNDS", "1"))))
    minutes = float(os.environ.get("DATUMFLOW_LONG_MINUTES", "0"))
    report = os.environ.get(REPORT_ENV, "")
    began = time.monotonic()
    rng = random.Random(7)
    workload = await Workload.start(d, tmp_path, sleep=SLEEP, control=CONTROL)
    total = 0

    def over() -> bool:
        return bool(minutes) and time.monotonic() - began > minutes * 60

    for i in range(jobs):
        if over():
            break
        scenario, inject = KINDS[i % len(KINDS)]
        await eventually(d.replicas_current, timeout=120, interval=0.5, what="a whole cluster")
        job = await workload.job(DATUMS, seed=1000 + i)
        progress = Progress(job)
        injected: list[Timed] = []
        try:
            await job.reach(DATUMS // 10, timeout=180)
            while (
                scenario != BASELINE
                and len(injected) < PER_JOB
                and not over()
                and await job.processed() < DATUMS * 0.8
            ):
                for fault in await inject(d, workload, rng):
                    injected.append(progress.after(fault, time.monotonic(), scenario))
                    total += 1
                await asyncio.sleep(rng.uniform(0.5, 3))
            info = await job.wait(timeout=600)
        finally:
            await progress.stop()
        assert injected or over() or scenario == BASELINE, (
            f"{scenario}: the job ended before the first fault"
        )
        # The progress after the last faults is known only now that the job is done.
        injected = [progress.after(t.fault, t.fault.at + t.recovered, scenario) for t in injected]
        figures = await job.verify(
            info, scenario=f"cluster: {scenario}", faults=faults.tally([t.fault for t in injected])
        )
        for timed in injected:
            if report:
                _append(report + ".faults", timed)
        print(
            f"[cluster long] job {i + 1}: {scenario}, {len(injected)} faults, {total} in all;"
            f" {figures.rerun_datums} datums re-run; {figures.seconds:.0f} s",
            flush=True,
        )
