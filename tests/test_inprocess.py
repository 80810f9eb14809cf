"""In-process transforms (`transform.function`), end to end through `datumflow up`, and the
user-code thread on its own.

The functions the pipelines call are defined here: the workers import `tests.test_inprocess`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from datumflow.broker.messages import DatumInput, DatumTask, FileRef
from datumflow.functions.worker.tasks import check_paths
from datumflow.functions.worker.userthread import UserThread
from datumflow.pfs.paths import BadPath
from datumflow.transform import Datum, DatumTimeout
from tests.helpers import (
    REPO_ROOT,
    Cluster,
    create_pipeline,
    output_files,
    put_files,
    wait_job_done,
)

pytestmark = pytest.mark.asyncio

# ----------------------------------------------------------------------- functions the workers call


def upper(inputs: dict[str, Path], out: Path) -> None:
    """Each input file, upper-cased, under the same name."""
    for path in _files(inputs["lines"]):
        (out / path.name).write_bytes(path.read_bytes().upper())


def describe(inputs: dict[str, Path], out: Path, *, datum: Datum) -> None:
    """What the function was given: its paths relative to the layout, the env, the datum id."""
    (out / f"{datum.id[:12]}.txt").write_text(
        "\n".join(
            [
                *(f"{name}={path.relative_to(datum.pfs)}" for name, path in sorted(inputs.items())),
                f"tag={datum.env['TAG']}",
                f"attempt={datum.attempt}",
                f"out={out == datum.pfs / 'out'}",
                f"pid={os.getpid()}",
            ]
        )
    )


def poisoned(inputs: dict[str, Path], out: Path, *, datum: Datum) -> None:
    """Fails on /poison, every time; copies anything else. Leaves a mark per call."""
    (Path(datum.env["MARKS"]) / f"{datum.id}.{datum.attempt}").touch()
    for path in _files(inputs["in"]):
        if path.name == "poison":
            raise ValueError("this datum is poison")
        (out / path.name).write_bytes(path.read_bytes())


def sluggish(inputs: dict[str, Path], out: Path, *, datum: Datum) -> None:
    """Never ends on /slow (until stopped); copies anything else."""
    for path in _files(inputs["in"]):
        if path.name == "slow":
            (Path(datum.env["MARKS"]) / "slow-started").touch()
            while True:
                time.sleep(0.02)
        (out / path.name).write_bytes(path.read_bytes())


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


# -------------------------------------------------------------------------------------- end to end


def _cluster(make_cluster, **extra: str) -> Cluster:  # type: ignore[no-untyped-def]
    # The workers import this module: make sure they find it whatever their working directory.
    return make_cluster(PYTHONPATH=str(REPO_ROOT), **extra)


async def test_function_over_files_and_directories(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster = _cluster(make_cluster)
    files = {f"/file{i:02d}.txt": f"line {i}\n".encode() for i in range(30)}
    await put_files(cluster, "lines", files)
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "upper"},
            "input": {"pfs": {"repo": "lines", "glob": "/*"}},
            "transform": {"function": "tests.test_inprocess:upper"},
            "parallelism_spec": {"constant": 2},
        },
    )
    [job] = await wait_job_done(cluster, "upper")
    assert job.state == "success", job.reason
    assert (job.data_total, job.data_processed, job.data_failed, job.data_skipped) == (30, 30, 0, 0)
    assert await output_files(cluster, "upper") == {p: d.upper() for p, d in files.items()}

    # Glob "/": one datum whose input is the whole repo, a directory.
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "whole"},
            "input": {"pfs": {"repo": "lines", "glob": "/"}},
            "transform": {"function": "tests.test_inprocess:upper"},
        },
    )
    [job] = await wait_job_done(cluster, "whole")
    assert job.state == "success", job.reason
    assert (job.data_total, job.data_processed) == (1, 1)
    assert await output_files(cluster, "whole") == {p: d.upper() for p, d in files.items()}


async def test_function_sees_its_layout_env_and_datum(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster = _cluster(make_cluster)
    await put_files(cluster, "a", {"/x/one.txt": b"1", "/y/two.txt": b"2"})
    await put_files(cluster, "b", {"/b.txt": b"b"})
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "describe"},
            "input": {
                "cross": [
                    {"pfs": {"repo": "a", "glob": "/*"}},
                    {"pfs": {"repo": "b", "glob": "/*", "name": "bee"}},
                ]
            },
            "transform": {
                "function": "tests.test_inprocess:describe",
                "env": {"TAG": "hello"},
            },
        },
    )
    [job] = await wait_job_done(cluster, "describe")
    assert job.state == "success", job.reason
    assert (job.data_total, job.data_processed) == (2, 2)
    outputs = await output_files(cluster, "describe")
    lines = sorted(tuple(data.decode().splitlines()[:-1]) for data in outputs.values())
    assert lines == [
        ("a=a/x", "bee=bee/b.txt", "tag=hello", "attempt=1", "out=True"),
        ("a=a/y", "bee=bee/b.txt", "tag=hello", "attempt=1", "out=True"),
    ]
    # Both datums ran in one worker process, the one supervised for the pipeline.
    pids = {data.decode().splitlines()[-1] for data in outputs.values()}
    assert len(pids) == 1


async def test_an_exception_is_a_failed_attempt(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster = _cluster(make_cluster)
    marks = tmp_path / "marks"
    marks.mkdir()
    files = {f"/ok{i}": f"{i}".encode() for i in range(5)} | {"/poison": b"x"}
    await put_files(cluster, "in", files)
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "poisoned"},
            "input": {"pfs": {"repo": "in", "glob": "/*"}},
            "transform": {
                "function": "tests.test_inprocess:poisoned",
                "env": {"MARKS": str(marks)},
            },
            "datum_tries": 2,
        },
    )
    [job] = await wait_job_done(cluster, "poisoned")
    assert job.state == "failure"
    assert (job.data_total, job.data_processed, job.data_failed) == (6, 5, 1)
    assert "ValueError: this datum is poison" in job.reason
    calls = sorted(p.name.split(".")[1] for p in marks.iterdir())
    # Five datums once each, the poison twice (datum_tries), then given up.
    assert calls == ["1"] * 6 + ["2"]


async def test_datum_timeout_stops_a_function(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster = _cluster(make_cluster)
    marks = tmp_path / "marks"
    marks.mkdir()
    files = {"/a": b"a", "/b": b"b", "/slow": b"s", "/z": b"z"}
    await put_files(cluster, "in", files)
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "sluggish"},
            "input": {"pfs": {"repo": "in", "glob": "/*"}},
            "transform": {
                "function": "tests.test_inprocess:sluggish",
                "env": {"MARKS": str(marks)},
            },
            "datum_tries": 1,
            "datum_timeout": "1s",
            # All four datums in one set: the one after the slow datum runs on a fresh thread.
            "datum_set_spec": {"number": 4},
        },
    )
    [job] = await wait_job_done(cluster, "sluggish")
    assert job.state == "failure"
    assert (job.data_total, job.data_processed, job.data_failed) == (4, 3, 1)
    assert "datum_timeout (1s)" in job.reason
    assert (marks / "slow-started").exists()
    assert await output_files(cluster, "sluggish") == {}  # a failed job commits nothing
    log = cluster.log("worker-sluggish-0")
    assert "Traceback" not in log, log


async def test_a_bad_reference_fails_every_datum_clearly(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster = _cluster(make_cluster)
    await put_files(cluster, "in", {"/a": b"a", "/b": b"b"})
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "missing"},
            "input": {"pfs": {"repo": "in", "glob": "/*"}},
            "transform": {"function": "tests.no_such_module:run"},
        },
    )
    [job] = await wait_job_done(cluster, "missing")
    assert job.state == "failure"
    assert (job.data_total, job.data_processed, job.data_failed) == (2, 0, 2)
    assert "importing 'tests.no_such_module' failed" in job.reason


# --------------------------------------------------------------------------- the user-code thread


async def test_the_thread_reports_each_job_and_survives_a_timeout() -> None:
    thread = UserThread()
    started: list[int] = []

    def job(n: int, seconds: float):  # type: ignore[no-untyped-def]
        def run(lane: int) -> tuple[int, int]:
            started.append(n)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                time.sleep(0.01)
            return n, lane

        return run

    def broken(lane: int) -> None:
        raise OSError("disk full")

    jobs = [job(0, 0), job(1, 0), job(2, 30), broken, job(4, 0)]
    results = [(i, r) async for i, r in thread.each(jobs, timeout=0.5)]
    assert [i for i, _ in results] == [0, 1, 2, 3, 4]
    assert results[0][1] == (0, 1) and results[1][1] == (1, 1)
    assert isinstance(results[2][1], DatumTimeout)
    assert isinstance(results[3][1], OSError)
    # After the timeout the rest ran on a fresh thread, number 2.
    assert results[4][1] == (4, 2)
    assert started == [0, 1, 2, 4]
    thread.close()


async def test_halting_a_run_stops_after_the_job_in_hand() -> None:
    thread = UserThread()
    entered = asyncio.Event()
    release = threading.Event()
    loop = asyncio.get_running_loop()

    def held(lane: int) -> str:
        # In hand until the test has halted the run, however slow the machine.
        loop.call_soon_threadsafe(entered.set)
        assert release.wait(10), "the test never released the job in hand"
        return "done"

    run = thread.each([held, held, held])
    seen = []

    async def consume() -> None:
        async for index, result in run:
            seen.append((index, result))

    consumer = asyncio.create_task(consume())
    try:
        await asyncio.wait_for(entered.wait(), 10)
        run.halt()
        release.set()
        await asyncio.wait_for(consumer, 10)
    finally:
        release.set()
        consumer.cancel()
        thread.close()
    assert seen == [(0, "done")]


async def test_the_loop_hears_when_the_last_job_starts() -> None:
    """So that a worker fetches its next set then, and the thread does not wait for it."""
    thread = UserThread()
    release = threading.Event()
    heard: list[list[int]] = []
    started: list[int] = []

    def job(n: int):  # type: ignore[no-untyped-def]
        def run(lane: int) -> int:
            started.append(n)
            if n == 2:
                assert release.wait(10), "the test never released the last job"
            return n

        return run

    def on_last() -> None:
        heard.append(list(started))
        release.set()

    try:
        results = [r async for _, r in thread.each([job(0), job(1), job(2)], on_last=on_last)]
    finally:
        release.set()
        thread.close()
    assert results == [0, 1, 2]
    # Once, on the loop, while the last job was in hand (it waited for this).
    assert len(heard) == 1 and heard[0][:2] == [0, 1]


async def test_a_quick_job_is_reported_while_a_slow_one_runs() -> None:
    """A result held back to go out with others is still reported within REPORT, not when the
    job after it ends: its datum is done, and a stop in between would run it again."""
    thread = UserThread()
    release = threading.Event()

    def quick(lane: int) -> str:
        return "quick"

    def slow(lane: int) -> str:
        assert release.wait(30), "the test never released the slow job"
        return "slow"

    run = thread.each([quick, slow])
    results = aiter(run)
    try:
        # Well before the slow job ends (it waits for the test), however loaded the machine.
        first = await asyncio.wait_for(anext(results), 10)
        assert first == (0, "quick")
        release.set()
        assert await asyncio.wait_for(anext(results), 10) == (1, "slow")
    finally:
        release.set()
        await results.aclose()  # type: ignore[attr-defined]
        thread.close()


async def test_the_thread_s_wait_for_a_cpu_is_counted() -> None:
    """Set sizes leave out the time user code waited for a CPU: here a process that spins on the
    same CPU makes the job wait about half of its wall time."""
    thread = UserThread()
    cpu = min(os.sched_getaffinity(0))
    spin = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    spinner = await asyncio.create_subprocess_exec(sys.executable, "-c", spin)

    def burn(lane: int) -> float:
        os.sched_setaffinity(0, {cpu})  # this thread only
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        return 0.0

    try:
        assert thread.waited() == 0.0  # no thread yet
        await thread.run(lambda lane: None)
        before = thread.waited()
        await thread.run(burn)
        assert thread.waited() - before >= 0.1
    finally:
        spinner.kill()
        await spinner.wait()
        thread.close()


# ------------------------------------------------------------------------ what a datum may name


async def test_a_datum_naming_paths_outside_its_layout_is_refused() -> None:
    def task(name: str = "in", path: str = "/a/b.txt", root: str = "/a/") -> DatumTask:
        ref = FileRef(path=path, hash="h")
        inp = DatumInput(name=name, repo="r", branch="master", commit="c", files=[ref], root=root)
        return DatumTask(pipeline="p", version=1, job="j", datum="d", hash="h", inputs=[inp])

    check_paths(task())
    check_paths(task(root="/"))
    for bad in (
        task(path="/a/../../etc/passwd"),
        task(path="relative"),
        task(path="/a//b"),
        task(root="/../"),
        task(name="../../tmp"),
        task(name="out"),
    ):
        with pytest.raises(BadPath):
            check_paths(bad)
