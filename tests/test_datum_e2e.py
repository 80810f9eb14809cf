"""Datum semantics end to end: skipping across commits, changed and deleted files, every_job,
update with and without --reprocess, err_cmd recovery, accept_return_code, and logs."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    HOST_PID,
    Cluster,
    commit,
    create_pipeline,
    eventually,
    jobs_of,
    marks_of,
    output_files,
    put_files,
    shared_cluster,
    wait_job_done,
)

pytestmark = pytest.mark.asyncio

# Copies each input file to the output, leaving a mark `<file>.<pid>` per run of the user code.
COPY = (
    f"{HOST_PID}; "
    'for f in /pfs/src/*; do n=$(basename "$f"); touch "$MARKS/$n.$pid"; cp "$f" "/pfs/out/$n"; done'
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One `datumflow up` for the module: each test has its own repo and pipeline."""
    with shared_cluster(tmp_path_factory.mktemp("datum-e2e"), DATUMFLOW_ACK_WAIT="2") as shared:
        yield shared


def figures(job) -> tuple[str, int, int, int, int, int]:  # type: ignore[no-untyped-def]
    return (
        job.state,
        job.data_total,
        job.data_processed,
        job.data_skipped,
        job.data_failed,
        job.data_recovered,
    )


def copy_spec(name: str, repo: str, marks: Path, **extra: object) -> dict:
    return {
        "pipeline": {"name": name},
        "input": {"pfs": {"repo": repo, "name": "src", "glob": "/*"}},
        "transform": {"cmd": ["sh", "-c", COPY], "env": {"MARKS": str(marks)}},
        **extra,
    }


async def test_skipping_across_commits_updates_and_reprocess(
    cluster: Cluster, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    await put_files(cluster, "letters", {"/a": b"a1", "/b": b"b1", "/c": b"c1"})
    create_pipeline(cluster, tmp_path, copy_spec("copy", "letters", marks))
    [first] = await wait_job_done(cluster, "copy")
    assert figures(first) == ("success", 3, 3, 0, 0, 0)

    # A changed file and a new one run; the rest are skipped and keep their output.
    await commit(cluster, "letters", {"/b": b"b2", "/d": b"d1"})
    second = (await wait_job_done(cluster, "copy", count=2))[0]
    assert figures(second) == ("success", 4, 2, 2, 0, 0)
    assert await output_files(cluster, "copy") == {
        "/a": b"a1",
        "/b": b"b2",
        "/c": b"c1",
        "/d": b"d1",
    }

    # A deleted file takes its output with it; nothing runs.
    await commit(cluster, "letters", {}, deletes=["/c"])
    third = (await wait_job_done(cluster, "copy", count=3))[0]
    assert figures(third) == ("success", 3, 0, 3, 0, 0)
    assert await output_files(cluster, "copy") == {"/a": b"a1", "/b": b"b2", "/d": b"d1"}
    assert marks_of(marks) == ["a", "b", "b", "c", "d"]

    datums = json.loads(cluster.cli("list", "datum", f"copy@{third.id}", "--json").stdout)
    assert sorted((d["files"][0]["path"], d["state"], d["time"]) for d in datums) == [
        ("/a", "skipped", 0),
        ("/b", "skipped", 0),
        ("/d", "skipped", 0),
    ]

    # An update keeps the salt: the new version's job skips everything...
    spec = tmp_path / "copy.json"
    cluster.cli("update", "pipeline", "-f", str(spec))
    fourth = (await wait_job_done(cluster, "copy", count=4))[0]
    assert fourth.version == 2
    assert figures(fourth) == ("success", 3, 0, 3, 0, 0)
    # ...and --reprocess renews it: everything runs again.
    cluster.cli("update", "pipeline", "-f", str(spec), "--reprocess")
    fifth = (await wait_job_done(cluster, "copy", count=5))[0]
    assert fifth.version == 3
    assert figures(fifth) == ("success", 3, 3, 0, 0, 0)
    assert marks_of(marks) == ["a", "a", "b", "b", "b", "c", "d", "d"]
    assert await output_files(cluster, "copy") == {"/a": b"a1", "/b": b"b2", "/d": b"d1"}


async def test_every_job_reprocesses_everything(cluster: Cluster, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    await put_files(cluster, "words", {"/a": b"a", "/b": b"b"})
    create_pipeline(
        cluster, tmp_path, copy_spec("again", "words", marks, reprocess_spec="every_job")
    )
    [first] = await wait_job_done(cluster, "again")
    assert figures(first) == ("success", 2, 2, 0, 0, 0)
    await commit(cluster, "words", {"/c": b"c"})
    second = (await wait_job_done(cluster, "again", count=2))[0]
    assert figures(second) == ("success", 3, 3, 0, 0, 0)
    assert marks_of(marks) == ["a", "a", "b", "b", "c"]


async def test_a_workers_datums_overlap_but_run_their_code_one_at_a_time(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A set of command datums is downloaded and uploaded side by side, but each datum's code
    runs alone, on its own /pfs: a lock directory taken while it runs is never found taken."""
    marks = tmp_path / "marks"
    marks.mkdir()
    lock = tmp_path / "running"
    script = (
        f'mkdir {lock} || {{ echo "two datums at once" >&2; exit 3; }}; sleep 0.05; '
        f"{COPY}; rmdir {lock}"
    )
    files = {f"/f{i:02d}": f"datum {i}".encode() for i in range(12)}
    await put_files(cluster, "overlap", files)
    spec = copy_spec(
        "overlapped",
        "overlap",
        marks,
        datum_set_spec={"number": 6},
        datum_tries=1,
        parallelism_spec={"constant": 1},
    )
    spec["transform"]["cmd"] = ["sh", "-c", script]
    create_pipeline(cluster, tmp_path, spec)
    [job] = await wait_job_done(cluster, "overlapped")
    assert figures(job) == ("success", 12, 12, 0, 0, 0), job.reason
    assert marks_of(marks) == sorted(n.lstrip("/") for n in files)
    await eventually(
        lambda: output_files(cluster, "overlapped"),
        until=lambda got: got == files,
        what="every datum's output in the output commit",
    )


async def test_err_cmd_recovers_and_recovered_datums_run_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    await put_files(cluster, "cases", {"/good": b"g", "/bad": b"b", "/three": b"3"})
    # bad writes output, then fails: err_cmd recovers it, and its output is dropped. three
    # exits 3, which accept_return_code makes a success.
    script = (
        f"{HOST_PID}; "
        'for f in /pfs/src/*; do n=$(basename "$f"); touch "$MARKS/$n.$pid";'
        ' cp "$f" "/pfs/out/$n"; case $n in bad) exit 1;; three) exit 3;; esac; done'
    )
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "lenient"},
            "input": {"pfs": {"repo": "cases", "name": "src", "glob": "/*"}},
            "transform": {
                "cmd": ["sh", "-c", script],
                "env": {"MARKS": str(marks)},
                "accept_return_code": [3],
                "err_cmd": [
                    "sh",
                    "-c",
                    f'{HOST_PID}; read line; touch "$MARKS/err-$line.$pid"',
                ],
                "err_stdin": ["handled"],
            },
        },
    )
    [first] = await wait_job_done(cluster, "lenient")
    assert figures(first) == ("success", 3, 2, 0, 0, 1)
    assert await output_files(cluster, "lenient") == {"/good": b"g", "/three": b"3"}
    # Recovered at the first attempt: no retry, err_cmd ran once with its stdin.
    assert marks_of(marks) == ["bad", "err-handled", "good", "three"]

    await commit(cluster, "cases", {"/new": b"n"})
    second = (await wait_job_done(cluster, "lenient", count=2))[0]
    # good and three are skipped; bad runs again (and is recovered again), new runs.
    assert figures(second) == ("success", 4, 1, 2, 0, 1)
    assert marks_of(marks) == ["bad", "bad", "err-handled", "err-handled", "good", "new", "three"]
    states = {
        d["files"][0]["path"]: d["state"]
        for d in json.loads(cluster.cli("list", "datum", f"lenient@{second.id}", "--json").stdout)
    }
    assert states == {
        "/bad": "recovered",
        "/good": "skipped",
        "/new": "success",
        "/three": "skipped",
    }


async def test_logs_are_streamed_live_and_kept_per_datum(cluster: Cluster, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    await put_files(cluster, "voices", {"/x": b"x", "/y": b"y"})
    # Each datum speaks on stdout and stderr, then ticks until the test's go, then says bye.
    # Live output is not kept for late listeners: the ticks tell when the follower listens.
    script = (
        'n=$(ls /pfs/src); echo "hello from $n"; echo "warning from $n" >&2;'
        ' while [ ! -e "$MARKS/go" ]; do echo "tick from $n"; sleep 0.1; done; echo "bye from $n"'
    )
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "talk"},
            "input": {"pfs": {"repo": "voices", "name": "src", "glob": "/*"}},
            "transform": {"cmd": ["sh", "-c", script], "env": {"MARKS": str(marks)}},
            "parallelism_spec": {"constant": 2},
        },
    )
    [job] = await eventually(lambda: jobs_of(cluster, "talk"), what="the job of talk")
    follower = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "datumflow.cli.main", "--home", str(cluster.home)),
        *("logs", "-p", "talk", "-j", job.id, "-f"),
        env=cluster.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert follower.stdout is not None
    received = b""
    try:
        # Live: both datums' output arrives while they still run.
        while b"tick from x" not in received or b"tick from y" not in received:
            received += await asyncio.wait_for(follower.stdout.read(4096), timeout=30)
        assert b"bye" not in received
        (marks / "go").touch()
        # With -j, following ends when the job does.
        rest, errors = await asyncio.wait_for(follower.communicate(), timeout=30)
        assert follower.returncode == 0, errors
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()
    followed = (received + rest).decode()
    assert followed.count("bye from x\n") == 1 and followed.count("bye from y\n") == 1, followed

    [done] = await wait_job_done(cluster, "talk")
    assert done.state == "success"
    # Kept: each datum's whole output, in order, stdout and stderr together.
    stored = cluster.cli("logs", "-p", "talk").stdout
    for n in ("x", "y"):
        assert f"hello from {n}\nwarning from {n}\ntick from {n}\n" in stored
        assert stored.count(f"bye from {n}\n") == 1
    datums = json.loads(cluster.cli("list", "datum", f"talk@{done.id}", "--json").stdout)
    x = next(d["id"] for d in datums if d["files"][0]["path"] == "/x")
    one = cluster.cli("logs", "-p", "talk", "-j", done.id, "--datum", x[:10]).stdout
    assert one.startswith("hello from x\nwarning from x\n") and one.endswith("bye from x\n")
    assert "from y" not in one
    missing = cluster.cli("logs", "-p", "talk", "--datum", "ffffffffff", check=False)
    assert missing.returncode == 1 and "no datum ffffffffff" in missing.stderr
