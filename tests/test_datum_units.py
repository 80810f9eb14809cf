"""The parts of datum handling that need no `datumflow up`: the sandbox's kill of a process tree,
the planner's datum list, the committer's tally, reasons and job timeouts, the results reader."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.messages import (
    DatumInput,
    DatumResult,
    DatumStats,
    DatumTask,
    FileRef,
    JobPlanned,
)
from datumflow.broker.records import JobInfo
from datumflow.errors import PermanentError, StorageError
from datumflow.functions.committer import Committer
from datumflow.functions.job_timeouts import JobTimeouts
from datumflow.functions.tally import Tally, failure_reason
from datumflow.functions.worker import sandbox
from datumflow.functions.worker.outputs import collect_outputs
from datumflow.functions.worker.spawner import Spawner
from datumflow.pfs import results
from datumflow.pfs.datums import Leaf, job_datums
from datumflow.pfs.pipelines import job_key
from datumflow.spec import Input, load_spec
from datumflow.storage import open_store
from tests.helpers import dead, eventually, reporting_pid

# -- the sandbox -----------------------------------------------------------------------------


async def dies(pid: int) -> bool:
    """Dead within a moment: a SIGKILL is sent at once, but the kernel takes its time to finish a
    process off on a busy machine."""
    try:
        return await eventually(lambda: dead(pid), timeout=3, interval=0.02)
    except AssertionError:
        return False


@pytest.fixture(params=["preexec", "spawner"])
def spawner(request: pytest.FixtureRequest) -> Iterator[Spawner | None]:
    """Both ways of starting user code: forked with a preexec_fn, and the spawner's fast path."""
    if request.param == "preexec":
        yield None
        return
    made = Spawner.create(mode="env")
    if made is None:
        pytest.skip("no setpriv on this machine: the spawner's fast path is not used")
    yield made
    made.close()


async def run_sh(
    layout: Path, script: str, timeout: float | None, spawner: Spawner | None = None
) -> sandbox.Outcome:
    layout.mkdir(exist_ok=True)
    return await sandbox.run(
        ["sh", "-c", script],
        stdin=b"",
        env=dict(os.environ),
        layout=layout,
        mode="env",
        timeout=timeout,
        spawner=spawner,
    )


@pytest.mark.asyncio
async def test_timeout_kills_every_child_however_it_left(
    tmp_path: Path, spawner: Spawner | None
) -> None:
    # A background child; one that left the session with setsid; one a job-control shell moved
    # to a process group of its own. All three hold the output pipe.
    script = (
        f"{reporting_pid('child', 'sleep 300')} &"
        f" setsid {reporting_pid('escaped', 'sleep 301')} &"
        f" (set -m; {reporting_pid('grouped', 'sleep 302')} & wait) &"
        " for f in child escaped grouped; do while [ ! -s $f ]; do sleep 0.01; done; done;"
        " sleep 303"
    )
    started = time.monotonic()
    outcome = await run_sh(tmp_path, script, timeout=1.0, spawner=spawner)
    assert outcome.returncode is None
    assert time.monotonic() - started < 4
    for name in ("child", "escaped", "grouped"):
        pid = int((tmp_path / name).read_text())
        assert await dies(pid), f"{name} ({pid}) outlived the timeout"


@pytest.mark.asyncio
async def test_a_daemon_left_holding_the_output_does_not_hang_the_datum(
    tmp_path: Path, spawner: Spawner | None
) -> None:
    # The user code exits at once, leaving a process in a session of its own with its stdout.
    script = (
        f"setsid {reporting_pid('daemon', 'sleep 300')} &"
        " while [ ! -s daemon ]; do sleep 0.01; done; echo done"
    )
    started = time.monotonic()
    outcome = await run_sh(tmp_path, script, timeout=None, spawner=spawner)
    assert (outcome.returncode, outcome.log) == (0, b"done\n")
    assert time.monotonic() - started < 4
    assert await dies(int((tmp_path / "daemon").read_text()))


@pytest.mark.asyncio
async def test_a_quick_run_keeps_its_output_and_code(
    tmp_path: Path, spawner: Spawner | None
) -> None:
    outcome = await run_sh(tmp_path, "echo out; echo err >&2; exit 7", timeout=5, spawner=spawner)
    assert (outcome.returncode, outcome.log) == (7, b"out\nerr\n")


# -- a command's layout, reused from datum to datum -----------------------------------------


def test_a_reused_layout_keeps_nothing_of_the_last_datum(tmp_path: Path) -> None:
    from datumflow.functions.worker.commands import _clear, _reset

    workdir = tmp_path / "layout-1"
    layout = workdir / "pfs"
    _reset(layout, {"a"})
    for path in ("a/x/deep", "out/result", "out/sub/more", "stray"):
        (layout / path).parent.mkdir(parents=True, exist_ok=True)
        (layout / path).write_text("last datum")
    (layout / "a" / "link").symlink_to(tmp_path)
    (layout / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    assert _clear(layout, workdir)
    # The next datum's input is another one: only its name (made by the download) and out stay.
    _reset(layout, {"b"})
    assert sorted(p.name for p in layout.iterdir()) == ["out"]
    assert list((layout / "out").iterdir()) == []
    assert tmp_path.is_dir() and (tmp_path / "layout-1").is_dir()  # links removed, not followed


def test_a_layout_that_cannot_be_emptied_is_removed_not_reused(tmp_path: Path) -> None:
    from datumflow.functions.worker.commands import _clear

    if shutil.which("chattr") is None:
        pytest.skip("needs chattr to make a file that cannot be removed")
    workdir = tmp_path / "layout-1"
    stuck = workdir / "pfs" / "out" / "stuck"
    stuck.parent.mkdir(parents=True)
    stuck.write_text("x")
    (workdir / "pfs" / "out" / "other").write_text("y")
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable files")
    try:
        assert not _clear(workdir / "pfs", workdir)
        # What could be removed is gone; the layout is not handed to the next datum.
        assert not (workdir / "pfs" / "out" / "other").exists()
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)


# -- the planner's datums --------------------------------------------------------------------


def leaf(repo: str, *paths: str) -> Leaf:
    return Leaf(
        name=repo,
        repo=repo,
        branch="master",
        commit="c1",
        files=[FileRef(path=p, size=1, hash="h" + p) for p in paths],
    )


def an_input(tree: dict) -> Input:
    return msgspec.convert(tree, Input)


def test_a_datum_a_union_gives_twice_is_one_datum() -> None:
    twice = an_input({"union": [{"pfs": {"repo": "a", "glob": "/*"}}] * 2})
    datums = list(job_datums(twice, [leaf("a", "/x", "/y"), leaf("a", "/x", "/y")]))
    assert [inputs[0].root for _, inputs in datums] == ["/x", "/y"]
    # Nested under a cross, the repeated pairs go too.
    nested = an_input(
        {
            "cross": [
                {"union": [{"pfs": {"repo": "a", "glob": "/*"}}] * 2},
                {"pfs": {"repo": "b", "glob": "/*"}},
            ]
        }
    )
    leaves = [leaf("a", "/x"), leaf("a", "/x"), leaf("b", "/1", "/2")]
    assert len(list(job_datums(nested, leaves))) == 2


def test_datums_without_a_union_are_all_kept() -> None:
    cross = an_input(
        {"cross": [{"pfs": {"repo": "a", "glob": "/*"}}, {"pfs": {"repo": "b", "glob": "/*"}}]}
    )
    datums = list(job_datums(cross, [leaf("a", "/x", "/y"), leaf("b", "/1", "/2")]))
    assert len(datums) == 4 and len({did for did, _ in datums}) == 4


# -- the committer's arithmetic --------------------------------------------------------------


def result(datum: str, state: str, **fields: object) -> DatumResult:
    return DatumResult(pipeline="p", job="j", datum=datum, state=state, **fields)  # type: ignore[arg-type]


def test_the_first_result_of_a_datum_counts_once() -> None:
    tally = Tally()
    stats = DatumStats(process_time=1.0, upload_bytes=10)
    for message in [
        result("d1", "success", stats=stats),
        result("d2", "failed", error="boom"),
        JobPlanned(pipeline="p", job="j", data_total=3),
        result("d1", "success", stats=stats),  # a redelivery that raced
        result("d2", "success"),  # a late worker after the max-deliveries failure
        result("d3", "skipped"),
    ]:
        tally.add(message)
    assert tally.complete
    job = tally.figures(JobInfo(pipeline="p", id="j", version=1, seq=1, created=0.0))
    counts = (job.data_total, job.data_processed, job.data_skipped, job.data_failed)
    assert counts == (3, 1, 1, 1)
    assert (job.stats.process_time, job.stats.upload_bytes) == (1.0, 10)
    assert [e.state for e in tally.index()] == ["success", "failed", "skipped"]


def test_the_failure_reason_names_the_datum_and_its_files() -> None:
    files = [FileRef(path=f"/f{i}") for i in range(5)]
    failed = [result("a" * 64, "failed", error="exit 1", files=files), result("b" * 64, "failed")]
    assert failure_reason(failed) == (
        f"datum {'a' * 12} (/f0, /f1, /f2, ...) failed: exit 1 (and 1 more failed datums)"
    )
    assert failure_reason([result("c" * 64, "failed", error="x")]) == f"datum {'c' * 12} failed: x"


def test_first_results_and_planned_total() -> None:
    events = [result("d1", "failed"), result("d1", "success"), result("d2", "success")]
    assert {d: r.state for d, r in results.first_results(events).items()} == {
        "d1": "failed",
        "d2": "success",
    }
    assert results.planned_total(events) is None
    assert results.planned_total([*events, JobPlanned(pipeline="p", job="j", data_total=2)]) == 2


# -- job timeouts, against a real broker -----------------------------------------------------


async def running_job(committer: Committer, name: str, job: str, *, started: float) -> None:
    record = JobInfo(
        pipeline=name,
        id=job,
        version=1,
        state="running",
        seq=1,
        created=started,
        started=started,
        data_total=2,
    )
    await committer.pipelines.jobs.create(job_key(name, job), record)
    await committer.pipelines.heads.update(name, lambda h: msgspec.structs.replace(h, last_job=job))


async def queued(broker: Broker, pipeline: str) -> int:
    info = await broker.js.stream_info(
        subjects.DATUMS_STREAM, subjects_filter=subjects.datum(pipeline)
    )
    return (info.state.subjects or {}).get(subjects.datum(pipeline), 0)


@pytest.mark.asyncio
async def test_job_timeout_kills_only_the_overdue_job(broker: Broker, tmp_path: Path) -> None:
    store = await open_store((tmp_path / "objects").as_uri())
    committer = Committer(broker=broker, store=store)
    await committer.repos.create_repo("in")
    for name, timeout in [("bounded", "5s"), ("patient", "1h"), ("free", "")]:
        spec = {
            "pipeline": {"name": name},
            "input": {"pfs": {"repo": "in", "glob": "/*"}},
            "transform": {"cmd": ["true"]},
            "job_timeout": timeout,
        }
        await committer.pipelines.create(load_spec(json.dumps(spec)), ack_wait=2)
        await running_job(committer, name, f"{name}-job", started=time.time() - 60)
    # The overdue job has one datum done and one still queued.
    task = DatumTask(
        pipeline="bounded",
        version=1,
        job="bounded-job",
        datum="d2",
        hash="h",
        inputs=[DatumInput(name="in", repo="in", branch="master", commit="c", files=[])],
    )
    await broker.publish(subjects.datum("bounded"), task, msg_id="bounded-job:d2")
    done = DatumResult(pipeline="bounded", job="bounded-job", datum="d1", state="success")
    await broker.publish(subjects.result("bounded", "bounded-job"), done, msg_id="d1")
    planned = JobPlanned(pipeline="bounded", job="bounded-job", data_total=2)
    await broker.publish(subjects.job_planned("bounded", "bounded-job"), planned, msg_id="p")
    assert await queued(broker, "bounded") == 1

    timeouts = JobTimeouts(committer=committer)
    assert await timeouts.check() == ["bounded@bounded-job"]
    killed = await committer.pipelines.get_job("bounded", "bounded-job")
    assert killed.state == "killed" and killed.finished
    assert killed.reason == (
        "job_timeout: the job ran longer than 5s and was killed; 1 of 2 datums were done"
    )
    assert (killed.data_processed, killed.data_total) == (1, 2)
    assert await queued(broker, "bounded") == 0
    for name in ("patient", "free"):
        assert (await committer.pipelines.get_job(name, f"{name}-job")).state == "running"

    # Killed once: a second look, or a late result, changes nothing.
    assert await timeouts.check() == []
    late = DatumResult(pipeline="bounded", job="bounded-job", datum="d2", state="success")
    await committer._tally("bounded", "bounded-job")
    committer.tallies[("bounded", "bounded-job")].add(late)
    await committer._progress("bounded", "bounded-job")
    assert await committer.pipelines.get_job("bounded", "bounded-job") == killed
    await store.close()


@pytest.mark.asyncio
async def test_an_object_store_failure_ending_a_job_redelivers_its_results(
    broker: Broker, tmp_path: Path
) -> None:
    """The store failing (past its own retries) while the committer writes a job's output
    commit: the results come back and the job ends once the store answers, and the committer
    keeps running rather than exiting with the error."""
    store = await open_store((tmp_path / "objects").as_uri())
    failures = [StorageError("the store is unreachable (injected)")]
    real_put = store.put_bytes

    async def put_bytes(data: bytes) -> tuple[str, int]:
        if armed and failures:
            raise failures.pop()
        return await real_put(data)

    armed = False
    store.put_bytes = put_bytes  # type: ignore[method-assign]
    committer = Committer(broker=broker, store=store)
    await committer.repos.create_repo("in")
    spec = {
        "pipeline": {"name": "flaky"},
        "input": {"pfs": {"repo": "in", "glob": "/*"}},
        "transform": {"cmd": ["true"]},
    }
    await committer.pipelines.create(load_spec(json.dumps(spec)), ack_wait=2)
    await running_job(committer, "flaky", "flaky-job", started=time.time())
    # The job is planned and half done when the committer starts: it resumes the job (counting
    # one result) and the second result, fetched in a batch, is the one that ends it.
    planned = JobPlanned(pipeline="flaky", job="flaky-job", data_total=2)
    await broker.publish(subjects.job_planned("flaky", "flaky-job"), planned, msg_id="p")
    first = DatumResult(pipeline="flaky", job="flaky-job", datum="d1", state="success")
    await broker.publish(subjects.result("flaky", "flaky-job"), first, msg_id="d1")
    armed = True
    stop = asyncio.Event()
    run = asyncio.create_task(committer.run(stop))
    try:
        await eventually(lambda: ("flaky", "flaky-job") in committer.tallies, what="resumed")
        second = DatumResult(pipeline="flaky", job="flaky-job", datum="d2", state="success")
        await broker.publish(subjects.result("flaky", "flaky-job"), second, msg_id="d2")

        async def ended() -> bool:
            assert not run.done(), "the committer stopped"
            return (await committer.pipelines.get_job("flaky", "flaky-job")).state == "success"

        await eventually(ended, timeout=30)
        assert not failures  # the failure did happen
        assert not run.done()
    finally:
        stop.set()
        await asyncio.wait_for(run, 10)


# -- a datum's output --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_outputs_are_every_file_under_out_and_nothing_that_leads_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "deep" / "er").mkdir(parents=True)
    (out / "top").write_text("t")
    (out / "deep" / "er" / "leaf").write_text("l")
    (out / "same").symlink_to(out / "top")  # a link inside out: its file's content
    os.mkfifo(out / "pipe")  # not data: left out
    store = await open_store((tmp_path / "objects").as_uri())
    refs = await collect_outputs(store, out)
    assert [(r.path, r.size) for r in refs] == [("/deep/er/leaf", 1), ("/same", 1), ("/top", 1)]
    assert refs[1].hash == refs[2].hash

    (out / "deep" / "away").symlink_to(tmp_path)
    with pytest.raises(PermanentError, match=r"/pfs/out/deep/away is a symlink to .*outside"):
        await collect_outputs(store, out)
    (out / "deep" / "away").unlink()
    (out / "loop").symlink_to(out / "deep")
    with pytest.raises(PermanentError, match="/pfs/out/loop links to a directory"):
        await collect_outputs(store, out)
