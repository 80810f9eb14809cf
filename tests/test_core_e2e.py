"""The core flow end to end: commits → planner → workers → committer → output commits, with real
processes (`datumflow up`) on a real nats-server."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import msgspec
import nats
import pytest

from datumflow.broker import subjects
from datumflow.broker.messages import CommitEvent, FileRef
from tests.helpers import (
    HOST_PID,
    Cluster,
    create_pipeline,
    dead_letters,
    eventually,
    output_files,
    put_files,
    wait_job_done,
)

pytestmark = pytest.mark.asyncio


async def test_fifty_files_then_a_chained_pipeline(cluster: Cluster, tmp_path: Path) -> None:
    files = {f"/file{i:02d}.txt": f"line {i}\n".encode() for i in range(50)}
    await put_files(cluster, "lines", files)
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "upper"},
            "input": {"pfs": {"repo": "lines", "glob": "/*"}},
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    'for f in /pfs/lines/*; do tr a-z A-Z < "$f" > /pfs/out/$(basename "$f"); done',
                ],
            },
            "parallelism_spec": {"constant": 2},
        },
    )
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "joined"},
            "input": {"pfs": {"repo": "upper", "glob": "/"}},
            "transform": {"cmd": ["sh", "-c", "cat /pfs/upper/* > /pfs/out/all.txt"]},
        },
    )
    [job] = await wait_job_done(cluster, "upper")
    assert job.state == "success", job.reason
    assert (job.data_total, job.data_processed, job.data_failed) == (50, 50, 0)
    upper = await output_files(cluster, "upper")
    assert upper == {path: data.upper() for path, data in files.items()}

    [downstream] = await wait_job_done(cluster, "joined")
    assert downstream.state == "success", downstream.reason
    assert downstream.input_commits[0].repo == "upper"
    assert downstream.input_commits[0].commit == job.output_commit
    joined = await output_files(cluster, "joined")
    assert joined == {"/all.txt": b"".join(data.upper() for _, data in sorted(files.items()))}

    # `wait commit` follows the DAG and reports both jobs.
    result = cluster.cli("wait", "commit", "lines@master", "--timeout", "30")
    assert "upper@" in result.stderr and "joined@" in result.stderr


async def test_worker_killed_mid_datum_is_redelivered(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(DATUMFLOW_ACK_WAIT="2")
    marks = tmp_path / "marks"
    marks.mkdir()
    files = {f"/f{i}": f"{i}\n".encode() for i in range(6)}
    await put_files(cluster, "nums", files)
    # Each datum leaves a mark when it starts, then takes long enough to be killed in the middle.
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "slow"},
            "input": {"pfs": {"repo": "nums", "glob": "/*"}},
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    f"{HOST_PID}; "
                    'touch "$MARKS/$PACH_DATUM_ID.$pid"; sleep 1.5; cp /pfs/nums/* /pfs/out/',
                ],
                "env": {"MARKS": str(marks)},
            },
        },
    )
    await eventually(lambda: list(marks.iterdir()), timeout=30, what="a datum to start")
    [pid] = await eventually(lambda: cluster.worker_pids("slow"), what="the worker process")
    os.kill(pid, signal.SIGKILL)

    [job] = await wait_job_done(cluster, "slow", timeout=90)
    assert job.state == "success", job.reason
    assert (job.data_total, job.data_processed, job.data_failed) == (6, 6, 0)
    assert await output_files(cluster, "slow") == files
    started = [p.name.split(".")[0] for p in marks.iterdir()]
    # The killed datum ran twice; every other datum once.
    assert len(started) == 7, started
    assert len(set(started)) == 6


async def test_long_datum_with_heartbeats_is_not_redelivered(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(DATUMFLOW_ACK_WAIT="1")
    marks = tmp_path / "marks"
    marks.mkdir()
    await put_files(cluster, "in", {"/a": b"a", "/b": b"b"})
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "long"},
            "input": {"pfs": {"repo": "in", "glob": "/*"}},
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    f"{HOST_PID}; "
                    'touch "$MARKS/$PACH_DATUM_ID.$pid"; sleep 4; cp /pfs/in/* /pfs/out/',
                ],
                "env": {"MARKS": str(marks)},
            },
            "parallelism_spec": {"constant": 2},
        },
    )
    [job] = await wait_job_done(cluster, "long", timeout=60)
    assert job.state == "success", job.reason
    # Four times ack_wait each, and each started exactly once.
    assert sorted(p.name.split(".")[0] for p in marks.iterdir()) == sorted(
        set(p.name.split(".")[0] for p in marks.iterdir())
    )
    assert len(list(marks.iterdir())) == 2


async def test_garbage_on_the_commit_subject_is_dead_lettered(
    cluster: Cluster, tmp_path: Path
) -> None:
    await put_files(cluster, "src", {"/x": b"x\n"})
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "copy"},
            "input": {"pfs": {"repo": "src", "glob": "/*"}},
            "transform": {"cmd": ["sh", "-c", "cp /pfs/src/* /pfs/out/"]},
        },
    )
    await wait_job_done(cluster, "copy")
    nc = await nats.connect(cluster.server.url)
    try:
        js = nc.jetstream()
        await js.publish(subjects.commit("src"), b"\x00not json at all")
        await js.publish(subjects.commit("src"), b'{"v": 99, "repo": "src", "commit": "abc"}')
        await js.publish(subjects.commit("src"), b'{"repo": "src"}')
        letters = await dead_letters(cluster.server.url, "planner", 3)
        reasons = " | ".join(letter.reason for letter in letters)
        assert "not valid JSON" in reasons
        assert "v=99" in reasons
        assert "commit" in reasons  # the missing field is named

        # A valid external commit event after the garbage still runs: files already in the store.
        async with cluster.api() as api:
            key, size = await api.store.put_bytes(b"from outside\n")
        event = CommitEvent(
            repo="src",
            branch="master",
            commit="e" * 32,
            files=[FileRef(path="/external.txt", size=size, hash=key)],
            origin="external",
        )
        await js.publish(
            subjects.commit("src"),
            msgspec.json.encode(event),
            headers={"Nats-Msg-Id": event.commit},
        )
    finally:
        await nc.close()
    await wait_job_done(cluster, "copy", count=2)
    assert await output_files(cluster, "copy") == {"/external.txt": b"from outside\n"}
    # The external commit is a first-class commit of the repo.
    listing = cluster.cli("list", "commit", "src@master", "--json")
    commits = json.loads(listing.stdout)
    assert commits[0]["id"] == "e" * 32 and commits[0]["origin"] == "external"
