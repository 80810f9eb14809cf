"""The fault scenarios, sized by their callers: the quick form in CI, the long form by hand.

A `Rig` is a real `datumflow up` (through `make_cluster`) on the test's real nats-server, with the
model pipeline of harness.py. A round commits a fresh dataset (every file changes, so the job has
no datum to skip), breaks something on purpose while the job runs, and returns the figures of
`verify_exact`: the job ended SUCCESS with exact figures and the output of a fault-free run. The
quick form runs one round per fault kind; the long form runs many rounds on one rig.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import nats

from datumflow.broker import subjects
from datumflow.broker.records import JobInfo
from tests.faults.harness import (
    Dataset,
    Figures,
    diagnostics,
    function_pids,
    injected,
    jobs_if_reachable,
    make_dataset,
    pipeline_spec,
    sigkill,
    verify_exact,
)
from tests.helpers import Cluster, create_pipeline, eventually, put_files

MakeCluster = Callable[..., Cluster]


class Rig:
    """One cluster running the model pipeline; `commit` starts a job, `finish` checks it."""

    def __init__(self, cluster: Cluster, *, tmp_path: Path, name: str, datum_tries: int) -> None:
        self.cluster = cluster
        self.tmp_path = tmp_path
        self.name = name
        self.datum_tries = datum_tries
        self.marks = tmp_path / f"marks-{name}"
        self.marks.mkdir(exist_ok=True)
        self.commits = 0

    @classmethod
    def start(
        cls,
        make_cluster: MakeCluster,
        tmp_path: Path,
        *,
        name: str,
        datum_tries: int = 3,
        **settings: str,
    ) -> Rig:
        return cls(make_cluster(**settings), tmp_path=tmp_path, name=name, datum_tries=datum_tries)

    async def commit(self, datums: int, *, seed: int) -> tuple[Dataset, str, float]:
        """Commit a fresh dataset; the first commit also creates the pipeline. Returns the data,
        the commit id and when the job was set going."""
        data = make_dataset(datums, seed=seed)
        first = self.commits == 0
        started = time.monotonic()
        commit = await put_files(self.cluster, "src", data.files, create=first)
        if first:
            spec = pipeline_spec(
                self.name, repo="src", marks=self.marks, datum_tries=self.datum_tries
            )
            create_pipeline(self.cluster, self.tmp_path, spec)
        self.commits += 1
        return data, commit, started

    async def pid_of(self, function: str, *, timeout: float = 30) -> int:
        [pid] = await eventually(
            lambda: function_pids(self.cluster, function),
            until=lambda pids: len(pids) == 1,
            timeout=timeout,
            interval=0.05,
            what=f"a single {function} process",
        )
        return pid

    async def job_for(self, commit: str) -> JobInfo | None:
        jobs = await jobs_if_reachable(self.cluster, self.name)
        for job in jobs or []:
            if any(c.commit == commit for c in job.input_commits):
                return job
        return None

    async def wait(self, commit: str, *, timeout: float) -> JobInfo:
        try:
            return await eventually(
                lambda: self.job_for(commit),
                until=lambda job: job is not None and job.done,
                timeout=timeout,
                interval=0.2,
                what=f"the job of {self.name} for commit {commit} to finish",
            )
        except AssertionError as failed:
            raise AssertionError(f"{failed}\n{diagnostics(self.cluster, self.name)}") from None

    async def progress(self, commit: str, *, at_least: int, timeout: float = 120) -> None:
        """Until the commit's job has processed `at_least` datums (or is done)."""
        await eventually(
            lambda: self.job_for(commit),
            until=lambda job: job is not None and (job.data_processed >= at_least or job.done),
            timeout=timeout,
            interval=0.05,
            what=f"{self.name}: progress to {at_least} datums",
        )

    async def finish(
        self,
        commit: str,
        data: Dataset,
        *,
        scenario: str,
        faults: Counter[str],
        started: float,
        timeout: float,
    ) -> Figures:
        job = await self.wait(commit, timeout=timeout)
        return await verify_exact(
            self.cluster,
            self.name,
            data,
            job,
            marks=self.marks,
            scenario=scenario,
            faults=dict(faults),
            started=started,
        )


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        return []
    return out


# -- rounds -------------------------------------------------------------------------------------


async def reference_round(rig: Rig, *, datums: int, seed: int = 0) -> Figures:
    data, commit, started = await rig.commit(datums, seed=seed)
    return await rig.finish(
        commit, data, scenario="no fault", faults=Counter(), started=started, timeout=120
    )


async def worker_storm_round(
    rig: Rig, *, datums: int, kills: int, seed: int, timeout: float = 300
) -> Figures:
    """SIGKILL a random busy worker (one running user code: in the middle of a datum) `kills`
    times, spread evenly over the job's progress. Idle workers are spared: a worker killed while
    it starts up does no harm worth testing, and the supervisor's restart backoff would keep the
    pipeline down."""
    rng = random.Random(seed)
    faults: Counter[str] = Counter()
    data, commit, started = await rig.commit(datums, seed=seed)
    for i in range(kills):
        await rig.progress(commit, at_least=i * datums // (kills + 1), timeout=timeout)

        async def killed_one_or_done() -> bool:
            busy = [p for p in function_pids(rig.cluster, "worker") if _children(p)]
            if busy and sigkill(rng.choice(busy)):
                faults["worker SIGKILL mid-datum"] += 1
                return True
            job = await rig.job_for(commit)
            return job is not None and job.done

        await eventually(
            killed_one_or_done, timeout=timeout, interval=0.02, what="a busy worker to kill"
        )
    assert faults["worker SIGKILL mid-datum"] == kills, f"only {faults} of {kills} kills landed"
    return await rig.finish(
        commit,
        data,
        scenario="worker SIGKILL storm",
        faults=faults,
        started=started,
        timeout=timeout,
    )


async def broker_round(
    rig: Rig,
    *,
    datums: int,
    restarts: int,
    down_for: float,
    hard: bool,
    seed: int,
    timeout: float = 300,
) -> Figures:
    """Stop nats-server (SIGTERM, or SIGKILL with `hard`) in the middle of the job, keep it down
    for a while, and start it again on the same ports with the same JetStream store."""
    server = rig.cluster.server
    rng = random.Random(seed)
    faults: Counter[str] = Counter()
    data, commit, started = await rig.commit(datums, seed=seed)
    done = 0
    for _ in range(restarts):
        # Somewhere in the middle of the job: some datums done, most still to do.
        done += 1 + rng.randint(0, max(datums // (restarts * 4), 1))
        await rig.progress(commit, at_least=done)
        if hard:
            server.kill()
        else:
            server.stop()
        faults["nats-server SIGKILL" if hard else "nats-server stop"] += 1
        await asyncio.sleep(down_for * (0.5 + rng.random()))
        server.start()
        await server.wait_ready()
    kind = "killed (SIGKILL)" if hard else "stopped"
    return await rig.finish(
        commit,
        data,
        scenario=f"nats-server {kind} and restarted mid-job",
        faults=faults,
        started=started,
        timeout=timeout,
    )


async def planner_round(rig: Rig, *, datums: int, seed: int, timeout: float = 300) -> Figures:
    """SIGKILL the planner while it is queueing the datums of a large commit: some (or all) are in
    the work queue, and the job is not marked planned."""
    faults: Counter[str] = Counter()
    if rig.commits == 0:
        # The pipeline is created with the first commit, by a CLI process: its planning would
        # start before we watch. A small first job, then the large commit to catch.
        small, first, begun = await rig.commit(5, seed=seed + 10_000)
        await rig.finish(
            first, small, scenario="no fault", faults=Counter(), started=begun, timeout=timeout
        )
    planner = await rig.pid_of("planner")
    subject = subjects.datum(rig.name)
    nc = await nats.connect(rig.cluster.server.url)
    try:
        # The planner queues a few hundred datums in a few milliseconds: watching the stream's
        # count would miss it. The first datum seen on the wire is the moment to kill it.
        seen = asyncio.Event()

        async def first(_msg: object) -> None:
            if not seen.is_set():
                sigkill(planner)
                seen.set()

        watch = await nc.subscribe(subject, cb=first)
        data, commit, started = await rig.commit(datums, seed=seed)
        await asyncio.wait_for(seen.wait(), timeout=60)
        await watch.unsubscribe()
        info = await nc.jetstream(timeout=2).stream_info(
            subjects.DATUMS_STREAM, subjects_filter=subject
        )
        queued = sum((info.state.subjects or {}).values())
    finally:
        await nc.close()
    assert queued > 0, "the planner was killed before it queued anything"
    faults["planner SIGKILL mid-planning"] += 1
    job = await rig.job_for(commit)
    assert job is not None and job.state == "created", f"the job was planned already: {job!r}"
    return await rig.finish(
        commit,
        data,
        scenario="planner SIGKILL while queueing a large commit",
        faults=faults,
        started=started,
        timeout=timeout,
    )


async def committer_round(
    rig: Rig, *, datums: int, kills: int, seed: int, timeout: float = 300
) -> Figures:
    """SIGKILL the committer at random while results come in, and (through the rig's storage
    faults `crash=committer:put_bytes:N`) in the middle of finishing the job: after the output
    manifest is stored, and after the output commit landed but before the job record says so."""
    rng = random.Random(seed)
    faults: Counter[str] = Counter()
    crash_dir = rig.cluster.home / "faults"
    for marker in crash_dir.glob("crashed-*"):
        marker.unlink()  # re-arm the crash points for this round
    before = injected(rig.cluster)["crash"]
    data, commit, started = await rig.commit(datums, seed=seed)
    done = 0
    for _ in range(kills):
        done += 1 + rng.randint(0, max(datums // (kills * 2), 1))
        await rig.progress(commit, at_least=done)
        for pid in function_pids(rig.cluster, "committer"):
            if sigkill(pid):
                faults["committer SIGKILL mid-job"] += 1
    job = await rig.wait(commit, timeout=timeout)
    crashes = injected(rig.cluster)["crash"] - before
    if crashes:
        faults["committer crash mid-commit"] += crashes
    assert job.done
    return await rig.finish(
        commit,
        data,
        scenario="committer SIGKILL while counting and while committing",
        faults=faults,
        started=started,
        timeout=timeout,
    )


async def restart_up_round(
    rig: Rig, *, datums: int, restarts: int, seed: int, timeout: float = 300
) -> Figures:
    """Stop the whole `datumflow up` (SIGTERM: it stops its functions and workers) in the middle of
    the job, and start it again on the same state directory."""
    rng = random.Random(seed)
    faults: Counter[str] = Counter()
    data, commit, started = await rig.commit(datums, seed=seed)
    done = 0
    for _ in range(restarts):
        done += 1 + rng.randint(0, max(datums // (restarts * 3), 1))
        await rig.progress(commit, at_least=done)
        rig.cluster.stop()
        faults["datumflow up stopped and started"] += 1
        assert not function_pids(rig.cluster, "worker"), "a worker outlived `datumflow up`"
        rig.cluster.start()
    return await rig.finish(
        commit,
        data,
        scenario="whole `datumflow up` stopped and started mid-job",
        faults=faults,
        started=started,
        timeout=timeout,
    )


async def slow_store_round(rig: Rig, *, datums: int, seed: int, timeout: float = 300) -> Figures:
    """Every function's object store is slow and fails now and then (the rig's storage_faults);
    the real store is underneath."""
    before = injected(rig.cluster)
    data, commit, started = await rig.commit(datums, seed=seed)
    await rig.wait(commit, timeout=timeout)
    counted = injected(rig.cluster) - before
    assert counted, "no storage fault was injected: the scenario tested nothing"
    setting = rig.cluster.env.get("DATUMFLOW_STORAGE_FAULTS", "")
    return await rig.finish(
        commit,
        data,
        scenario=f"slow, failing object store ({setting})",
        faults=Counter({f"object store {k}": v for k, v in counted.items()}),
        started=started,
        timeout=timeout,
    )
