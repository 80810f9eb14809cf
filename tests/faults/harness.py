"""What every fault scenario shares: a dataset with a known answer, the pipeline that computes it,
process finders and killers, and the check that a job survived its faults exactly.

The answer is a model: for every input file `/dNNNN.txt` with content c, the pipeline writes
`/dNNNN.txt.twice` = c + c and `/dNNNN.txt.sha` = `sha256sum` of c. The model's output manifest
key (the sha256 of the sorted file list with every file's size and sha256) is what a fault-free run
produces (`test_reference_run_matches_the_model` shows it), so "the output commit has the model's
manifest key, and every object in it has the bytes its hash says" is "identical, file for file and
byte for byte, to a run with no fault".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import msgspec
import nats

from datumflow.broker import subjects
from datumflow.broker.messages import FileRef
from datumflow.broker.records import CommitInfo, JobInfo
from datumflow.errors import BrokerError, DatumflowError
from datumflow.pfs import manifest
from tests.helpers import Cluster, eventually, jobs_of

REPORT_ENV = "DATUMFLOW_FAULT_REPORT"
"""A JSON-lines file every scenario appends its figures to (docs/reliability.md reads them)."""

SCRIPT = (
    'touch "$MARKS/$PACH_JOB_ID.$PACH_DATUM_ID.$$"; '
    "for f in /pfs/in/*; do "
    'n=$(basename "$f"); cat "$f" "$f" > "/pfs/out/$n.twice"; sha256sum < "$f" > "/pfs/out/$n.sha"; '
    "done"
)


class Dataset(msgspec.Struct, kw_only=True):
    files: dict[str, bytes]
    expected: dict[str, bytes]

    @property
    def size(self) -> int:
        return len(self.files)


def make_dataset(count: int, *, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    files = {
        f"/d{i:05d}.txt": rng.randbytes(rng.randint(16, 600)) + f" #{i}\n".encode()
        for i in range(count)
    }
    expected: dict[str, bytes] = {}
    for path, data in files.items():
        expected[path + ".twice"] = data + data
        expected[path + ".sha"] = f"{hashlib.sha256(data).hexdigest()}  -\n".encode()
    return Dataset(files=files, expected=expected)


def model_manifest_key(expected: dict[str, bytes]) -> str:
    refs = [
        FileRef(path=p, size=len(d), hash=hashlib.sha256(d).hexdigest())
        for p, d in sorted(expected.items())
    ]
    return hashlib.sha256(manifest.encode(refs)).hexdigest()


def pipeline_spec(
    name: str, *, repo: str, marks: Path, parallelism: int = 4, datum_tries: int = 3
) -> dict:
    return {
        "pipeline": {"name": name},
        "input": {"pfs": {"repo": repo, "name": "in", "glob": "/*"}},
        "transform": {"cmd": ["sh", "-c", SCRIPT], "env": {"MARKS": str(marks)}},
        "parallelism_spec": {"constant": parallelism},
        "datum_tries": datum_tries,
    }


# -- watching -----------------------------------------------------------------------------------


async def jobs_if_reachable(cluster: Cluster, pipeline: str) -> list[JobInfo] | None:
    """The pipeline's jobs, or None while the broker cannot be reached (it may be down on purpose)."""
    try:
        return await jobs_of(cluster, pipeline)
    except (TimeoutError, DatumflowError, OSError):
        return None


async def wait_for_job(cluster: Cluster, pipeline: str, *, timeout: float) -> JobInfo:
    """The pipeline's newest job once it is done, asked through any broker outage."""
    try:
        jobs = await eventually(
            lambda: jobs_if_reachable(cluster, pipeline),
            until=lambda jobs: bool(jobs) and jobs[0].done,
            timeout=timeout,
            interval=0.2,
            what=f"the job of {pipeline} to finish",
        )
    except AssertionError as failed:
        raise AssertionError(f"{failed}\n{diagnostics(cluster, pipeline)}") from None
    return jobs[0]


def diagnostics(cluster: Cluster, pipeline: str) -> str:
    parts = []
    for name in ("up", "planner", "committer", f"worker-{pipeline}-0", f"worker-{pipeline}-1"):
        parts.append(f"--- {name} ---\n{cluster.log(name)[-2500:]}")
    return "\n".join(parts)


def function_pids(cluster: Cluster, *words: str) -> list[int]:
    """Processes of this cluster (by DATUMFLOW_HOME) whose argv holds every word."""
    pids = []
    home = f"DATUMFLOW_HOME={cluster.home}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"datumflow.cli.main" in argv and all(w.encode() in argv for w in words):
            if home in environ:
                pids.append(int(proc.name))
    return pids


def sigkill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


async def stream_count(cluster: Cluster, stream: str, subject: str = "") -> int | None:
    """Messages in a stream (or under one subject of it); None if the broker is unreachable."""
    try:
        nc = await nats.connect(cluster.server.url, allow_reconnect=False, connect_timeout=2)
    except Exception:
        return None
    try:
        js = nc.jetstream(timeout=2)
        info = await js.stream_info(stream, subjects_filter=subject or None)
        if subject:
            return sum((info.state.subjects or {}).values())
        return info.state.messages
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


# -- the verdict --------------------------------------------------------------------------------


class Figures(msgspec.Struct, kw_only=True):
    scenario: str
    datums: int
    faults: dict[str, int]
    executions: int
    """Times the user code started, all attempts together (≥ datums: faults make datums re-run)."""
    rerun_datums: int
    lost: int
    duplicated: int
    seconds: float


def executions(marks: Path, job: str) -> Counter[str]:
    """How many times the user code started for each datum of `job`."""
    return Counter(p.name.split(".")[1] for p in marks.iterdir() if p.name.startswith(job + "."))


async def verify_exact(
    cluster: Cluster,
    pipeline: str,
    data: Dataset,
    job: JobInfo,
    *,
    marks: Path,
    scenario: str,
    faults: dict[str, int],
    started: float,
) -> Figures:
    """The job succeeded with exact figures and the model's output, and nothing was left over."""
    assert job.state == "success", f"{scenario}: job ended {job.state}: {job.reason}"
    figures = (
        job.data_total,
        job.data_processed,
        job.data_skipped,
        job.data_failed,
        job.data_recovered,
    )
    assert figures == (data.size, data.size, 0, 0, 0), (
        f"{scenario}: figures (total, processed, skipped, failed, recovered) = {figures},"
        f" expected ({data.size}, {data.size}, 0, 0, 0)"
    )
    async with cluster.api() as api:

        async def read_head() -> tuple[bool, CommitInfo | None]:
            # Just after a fault the cluster may still be settling (a server rejoining answers
            # "temporarily unavailable"): read again, as a user would.
            try:
                return True, await api.repos.head(pipeline, "master")
            except BrokerError:
                return False, None

        _, head = await eventually(
            read_head, until=lambda read: read[0], timeout=60, what="the output branch, read"
        )
        assert head is not None and head.id == job.output_commit, (
            f"{scenario}: the output branch is at {head and head.id}, the job made"
            f" {job.output_commit}"
        )
        refs = await manifest.read(api.store, head.manifest)
        got_paths = [r.path for r in refs]
        want_paths = sorted(data.expected)
        missing = sorted(set(want_paths) - set(got_paths))
        extra = sorted(set(got_paths) - set(want_paths))
        assert not missing and not extra, (
            f"{scenario}: {len(missing)} files missing (e.g. {missing[:3]}), {len(extra)} extra"
            f" (e.g. {extra[:3]})"
        )
        for ref in refs:
            content = await api.store.get_bytes(ref.hash)
            assert hashlib.sha256(content).hexdigest() == ref.hash, f"object {ref.hash} is corrupt"
            assert content == data.expected[ref.path], f"{scenario}: {ref.path} differs"
        assert head.manifest == model_manifest_key(data.expected)
    # Nothing stuck in the work queue, and no fault produced a dead letter. A broker killed with
    # SIGKILL may forget acks it had taken (JetStream flushes consumer state lazily): those datums
    # come back once more after the job is done, are done again and ignored. They must drain.
    await eventually(
        lambda: stream_count(cluster, subjects.DATUMS_STREAM, subjects.datum(pipeline)),
        until=lambda count: count == 0,
        timeout=60,
        interval=0.2,
        what=f"{scenario}: the datum messages left in the work queue to drain",
    )
    dead = await stream_count(cluster, subjects.DEAD_STREAM)
    assert dead == 0, f"{scenario}: {dead} dead letters"
    runs = executions(marks, job.id)
    assert set(runs) and len(runs) == data.size, (
        f"{scenario}: user code ran for {len(runs)} distinct datums, expected {data.size}"
    )
    result = Figures(
        scenario=scenario,
        datums=data.size,
        faults=dict(faults),
        executions=sum(runs.values()),
        rerun_datums=sum(1 for n in runs.values() if n > 1),
        lost=data.size - job.data_processed,
        duplicated=sum(figures[1:]) - job.data_total,
        seconds=round(time.monotonic() - started, 1),
    )
    report(result)
    return result


def report(figures: Figures) -> None:
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "ab") as f:
            f.write(msgspec.json.encode(figures) + b"\n")
    print(f"[fault figures] {msgspec.json.encode(figures).decode()}")


def injected(cluster: Cluster) -> Counter[str]:
    """Faults the FaultyStore recorded, by kind (error-before, error-after, crash)."""
    log = cluster.home / "faults" / "injected.log"
    if not log.exists():
        return Counter()
    return Counter(line.split()[3] for line in log.read_text().splitlines() if line.strip())
