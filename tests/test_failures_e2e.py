"""Failures end to end, with real processes: a poison datum, a datum that kills its worker every
time, a datum timeout with children, outputs that collide, and a job timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    HOST_PID,
    Cluster,
    commit,
    create_pipeline,
    dead,
    eventually,
    jobs_of,
    marks_of,
    output_files,
    put_files,
    reporting_pid,
    shared_cluster,
    wait_job_done,
)

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One `datumflow up` for the module, quick to redeliver: each test has its own repo and
    pipeline, and what it breaks (a worker, a job) is its pipeline's alone."""
    with shared_cluster(tmp_path_factory.mktemp("failures-e2e"), DATUMFLOW_ACK_WAIT="2") as shared:
        yield shared


async def kill_on_request(requests: Path) -> None:
    """Until cancelled: SIGKILL every process named in a file that appears in `requests`."""
    seen: set[str] = set()
    while True:
        for request in requests.iterdir():
            if request.name.startswith(".") or request.name in seen:
                continue
            seen.add(request.name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(request.read_text()), signal.SIGKILL)
        await asyncio.sleep(0.05)


def datums_of(cluster: Cluster, target: str) -> list[dict]:
    return json.loads(cluster.cli("list", "datum", target, "--json").stdout)


async def test_poison_datum_fails_alone_and_names_itself(cluster: Cluster, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    await put_files(cluster, "numbers", {"/a": b"a", "/b": b"b", "/poison": b"p", "/c": b"c"})
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "picky"},
            "input": {"pfs": {"repo": "numbers", "glob": "/*"}},
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    f"{HOST_PID}; "
                    'for f in /pfs/numbers/*; do n=$(basename "$f"); touch "$MARKS/$n.$pid";'
                    ' if [ "$n" = poison ]; then echo "cannot read $n" >&2; exit 3; fi;'
                    ' cp "$f" /pfs/out/; done',
                ],
                "env": {"MARKS": str(marks)},
            },
            "datum_tries": 2,
        },
    )
    [job] = await wait_job_done(cluster, "picky")
    assert job.state == "failure"
    assert (job.data_total, job.data_processed, job.data_failed) == (4, 3, 1)
    # Two attempts of the poison datum, one of each other.
    assert marks_of(marks) == ["a", "b", "c", "poison", "poison"]

    datums = {d["files"][0]["path"]: d for d in datums_of(cluster, f"picky@{job.id}")}
    assert {p: d["state"] for p, d in datums.items()} == {
        "/a": "success",
        "/b": "success",
        "/c": "success",
        "/poison": "failed",
    }
    poison = datums["/poison"]["id"]
    assert f"datum {poison[:12]} (/poison) failed" in job.reason
    assert "exited with code 3" in job.reason

    detail = json.loads(
        cluster.cli("inspect", "datum", f"picky@{job.id}", poison[:12], "--json").stdout
    )
    assert detail["id"] == poison and detail["attempts"] == 2
    assert "cannot read poison" in detail["error"]
    logs = cluster.cli("logs", "-p", "picky", "--datum", poison[:12]).stdout
    assert logs == "cannot read poison\n"


async def test_datum_that_kills_its_worker_every_time_ends_failed(
    cluster: Cluster, tmp_path: Path
) -> None:
    marks, kills = tmp_path / "marks", tmp_path / "kills"
    marks.mkdir()
    kills.mkdir()
    await put_files(cluster, "crashes", {"/a": b"a", "/crash": b"x", "/b": b"b"})
    # The user code cannot reach its worker (it runs in the worker's PID namespace): it names
    # the worker, and the test SIGKILLs it, as the kernel's OOM killer would.
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "crashy"},
            "input": {"pfs": {"repo": "crashes", "glob": "/*"}},
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    f"{HOST_PID}; "
                    'for f in /pfs/crashes/*; do n=$(basename "$f"); touch "$MARKS/$n.$pid";'
                    ' if [ "$n" = crash ]; then'
                    ' echo $ppid > "$KILLS/.$pid" && mv "$KILLS/.$pid" "$KILLS/$pid"; sleep 60;'
                    " fi;"
                    ' cp "$f" /pfs/out/; done',
                ],
                "env": {"MARKS": str(marks), "KILLS": str(kills)},
            },
            "datum_tries": 3,
        },
    )
    killing = asyncio.ensure_future(kill_on_request(kills))
    try:
        [job] = await wait_job_done(cluster, "crashy", timeout=90)
        assert job.state == "failure", job.reason
        assert (job.data_total, job.data_processed, job.data_failed) == (3, 2, 1)
        assert "worker died during each of its 3 attempts" in job.reason
        assert "(/crash)" in job.reason
        # Delivered exactly datum_tries times, then given up; the others ran once each.
        assert marks_of(marks) == ["a", "b", "crash", "crash", "crash"]
    finally:
        killing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await killing
    [crash] = [d for d in datums_of(cluster, f"crashy@{job.id}") if d["state"] == "failed"]
    assert crash["files"] == [{"input": "crashes", "repo": "crashes", "path": "/crash"}]


async def test_datum_timeout_kills_the_user_code_and_its_children(
    cluster: Cluster, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    await put_files(cluster, "sleepers", {"/slow": b"s"})
    # A child in the background, one that left the session, and the process itself all outlive
    # the timeout unless the worker kills them; the escaped one also holds the output pipe.
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "sleepy"},
            "input": {"pfs": {"repo": "sleepers", "glob": "/*"}},
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    f"{reporting_pid('$MARKS/child.pid', 'sleep 300')} &"
                    f" setsid {reporting_pid('$MARKS/escaped.pid', 'sleep 301')} &"
                    f' {HOST_PID}; echo $pid > "$MARKS/self.pid";'
                    ' while [ ! -s "$MARKS/child.pid" ] || [ ! -s "$MARKS/escaped.pid" ];'
                    " do sleep 0.01; done; sleep 302",
                ],
                "env": {"MARKS": str(marks)},
            },
            "datum_timeout": "1s",
            "datum_tries": 1,
        },
    )
    [job] = await wait_job_done(cluster, "sleepy", timeout=30)
    assert job.state == "failure"
    assert "ran longer than datum_timeout (1s) and was killed" in job.reason
    assert job.stats.process_time < 10
    pids = {p.stem: int(p.read_text()) for p in marks.glob("*.pid")}
    assert set(pids) == {"child", "escaped", "self"}
    for name, pid in pids.items():
        await eventually(lambda pid=pid: dead(pid), timeout=3, what=f"{name} ({pid}) to die")


async def test_colliding_outputs_fail_the_job(cluster: Cluster, tmp_path: Path) -> None:
    await put_files(cluster, "src", {"/one": b"1", "/two": b"2"})
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "same-path"},
            "input": {"pfs": {"repo": "src", "glob": "/*"}},
            "transform": {"cmd": ["sh", "-c", "cat /pfs/src/* > /pfs/out/result"]},
        },
    )
    # /one writes the file /x, /two the directory /x: a file and a directory at one path.
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "file-and-dir"},
            "input": {"pfs": {"repo": "src", "glob": "/*"}},
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    "if [ -e /pfs/src/one ]; then echo f > /pfs/out/x;"
                    " else mkdir /pfs/out/x; echo d > /pfs/out/x/y; fi",
                ],
            },
        },
    )
    [same] = await wait_job_done(cluster, "same-path")
    assert same.state == "failure"
    assert same.reason.startswith("duplicate path output by different datums: /result")
    assert same.data_processed == 2 and not same.output_commit
    [mixed] = await wait_job_done(cluster, "file-and-dir")
    assert mixed.state == "failure"
    assert "/x is output both as a file" in mixed.reason
    assert await output_files(cluster, "same-path") == {}


@pytest.mark.parametrize("sets", [0, 4], ids=["single-datums", "sets-of-4"])
async def test_job_timeout_kills_the_job_and_its_queue(
    cluster: Cluster, tmp_path: Path, sets: int
) -> None:
    """Killed past job_timeout, a job's queued datums are removed, and its datums in a worker's
    hands (a set of four) are dropped unrun: only the datum whose process had started finishes."""
    pipeline, repo = f"bounded{sets}", f"timed{sets}"
    marks = tmp_path / "marks"
    marks.mkdir()
    # Datums of files named s* wait for the test's go; the others run at once.
    spec = {
        "pipeline": {"name": pipeline},
        "input": {"pfs": {"repo": repo, "name": "in", "glob": "/*"}},
        "transform": {
            "cmd": [
                "sh",
                "-c",
                f"{HOST_PID}; "
                'for f in /pfs/in/*; do n=$(basename "$f"); touch "$MARKS/start-$n.$pid";'
                ' case $n in s*) while [ ! -e "$GO" ]; do sleep 0.05; done;; esac;'
                ' cp "$f" /pfs/out/; touch "$MARKS/end-$n.$pid"; done',
            ],
            "env": {"MARKS": str(marks), "GO": str(tmp_path / "go")},
        },
    }
    if sets:
        spec["datum_set_spec"] = {"number": sets}
    await put_files(cluster, repo, {"/f0": b"fast"})
    create_pipeline(cluster, tmp_path, spec)
    # The clock runs from the job's start, worker start-up included: set the timeout once the
    # worker is up, so that a slow machine cannot kill a job before its first datum.
    await wait_job_done(cluster, pipeline)
    create_pipeline(cluster, tmp_path, {**spec, "job_timeout": "3s"}, update=True)
    first = (await wait_job_done(cluster, pipeline, count=2))[0]
    assert (first.version, first.state, first.data_skipped) == (2, "success", 1), first.reason

    # Four datums and one worker: the job is killed with one datum running and three queued, or
    # (sets of four) waiting their turn in the worker's hands.
    await commit(cluster, repo, {f"/s{i}": b"slow" for i in range(1, 5)}, deletes=["/f0"])
    await eventually(lambda: "start-s1" in marks_of(marks), what="s1 to start")
    killed = (await wait_job_done(cluster, pipeline, count=3, timeout=30))[0]
    assert killed.state == "killed"
    assert killed.reason == (
        "job_timeout: the job ran longer than 3s and was killed; 0 of 4 datums were done"
    )
    assert 3 <= killed.finished - killed.started < 20
    assert (killed.data_total, killed.data_processed) == (4, 0)

    # The datum in hand finishes after all; its late result changes nothing.
    (tmp_path / "go").touch()
    await eventually(lambda: "end-s1" in marks_of(marks), what="s1 to finish")
    # The next commit gets a job of its own, which runs at once: the killed job's other datums
    # were removed from the queue or dropped unrun, or the one worker would go through them first.
    await commit(cluster, repo, {"/f1": b"fast"}, deletes=[f"/s{i}" for i in range(1, 5)])
    last = (await wait_job_done(cluster, pipeline, count=4, timeout=30))[0]
    assert last.state == "success", last.reason
    assert await output_files(cluster, pipeline) == {"/f1": b"fast"}
    assert marks_of(marks) == ["end-f0", "end-f1", "end-s1", "start-f0", "start-f1", "start-s1"]
    after = {j.id: j for j in await jobs_of(cluster, pipeline)}[killed.id]
    assert after == killed
    states = {
        d["files"][0]["path"]: d["state"] for d in datums_of(cluster, f"{pipeline}@{killed.id}")
    }
    assert states == {"/s1": "killed", "/s2": "killed", "/s3": "killed", "/s4": "killed"}
