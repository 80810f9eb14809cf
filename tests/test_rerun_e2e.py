"""`datumflow rerun job PIPELINE@JOB --failed` end to end, with real processes: only the failed
datums run again, the others are carried over, the output commit has every datum's output once
and feeds the pipelines downstream; and every refusal, by its message."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from datumflow.broker import subjects
from datumflow.broker.connection import connect
from datumflow.broker.messages import RerunRequest
from datumflow.broker.topology import ensure_rerun_subject, ensure_topology, planner_consumer_config
from datumflow.pfs.reruns import RerunRefused, rerun_failed
from datumflow.runtime.embedded import EmbeddedServer
from datumflow.settings import Settings
from datumflow.spec import load_spec
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One `datumflow up` for the module; each test has its own repos and pipelines."""
    with shared_cluster(tmp_path_factory.mktemp("rerun-e2e"), DATUMFLOW_ACK_WAIT="2") as shared:
        yield shared


def copy_unless_broken(repo: str, marks: Path, broken: Path) -> list[str]:
    """User code that copies each input file, and fails on a file named in `broken` (a directory
    outside the input: the cause a user fixes before rerunning). One mark per attempt."""
    return [
        "sh",
        "-c",
        f"{HOST_PID}; "
        f'for f in /pfs/{repo}/*; do n=$(basename "$f"); touch "{marks}/$n.$pid";'
        f' if [ -e "{broken}/$n" ]; then echo "$n is broken" >&2; exit 4; fi;'
        ' cp "$f" /pfs/out/; done',
    ]


async def test_rerun_runs_only_the_failed_datums_and_feeds_downstream(
    cluster: Cluster, tmp_path: Path
) -> None:
    marks, broken = tmp_path / "marks", tmp_path / "broken"
    marks.mkdir()
    broken.mkdir()
    (broken / "b").touch()
    (broken / "d").touch()
    files = {f"/{n}": n.encode() * 3 for n in "abcde"}
    await put_files(cluster, "letters", files)
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "copies"},
            "input": {"pfs": {"repo": "letters", "glob": "/*"}},
            "transform": {"cmd": copy_unless_broken("letters", marks, broken)},
            "datum_tries": 1,
        },
    )
    # Downstream: one datum over the whole output, which lists it.
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "listing"},
            "input": {"pfs": {"repo": "copies", "glob": "/"}},
            "transform": {"cmd": ["sh", "-c", "ls /pfs/copies > /pfs/out/names"]},
        },
    )
    [failed] = await wait_job_done(cluster, "copies")
    assert failed.state == "failure", failed.reason
    assert (failed.data_total, failed.data_processed, failed.data_failed) == (5, 3, 2)
    assert await jobs_of(cluster, "listing") == []  # a failed job commits nothing

    (broken / "b").unlink()
    (broken / "d").unlink()
    done = cluster.cli("rerun", "job", f"copies@{failed.id}", "--failed")
    new = done.stdout.strip()
    assert f"rerunning 2 datum(s) of copies@{failed.id}, 3 carried over" in done.stderr
    assert new.startswith("copies@") and new != f"copies@{failed.id}"
    assert cluster.cli("wait", "job", new).stdout.strip() == f"{new}: success"

    rerun = (await wait_job_done(cluster, "copies", count=2))[0]
    assert f"copies@{rerun.id}" == new and rerun.rerun_of == failed.id
    assert rerun.input_commits == failed.input_commits
    assert (rerun.data_total, rerun.data_processed, rerun.data_skipped) == (5, 2, 3)
    assert rerun.data_failed == 0
    # b and d ran twice (failed, then again), the others once: nothing carried over ran.
    assert marks_of(marks) == ["a", "b", "b", "c", "d", "d", "e"]
    assert await output_files(cluster, "copies") == files

    # The output commit is a commit like any other downstream.
    [listing] = await wait_job_done(cluster, "listing")
    assert listing.state == "success", listing.reason
    assert [c.commit for c in listing.input_commits] == [rerun.output_commit]
    assert (await output_files(cluster, "listing"))["/names"] == b"a\nb\nc\nd\ne\n"

    # The job rerun is not the newest any more; the rerun has nothing left to rerun.
    again = cluster.cli("rerun", "job", f"copies@{failed.id}", "--failed", check=False)
    assert again.returncode == 1
    assert f"job copies@{failed.id} is not the newest job of pipeline copies ({new} is)" in (
        again.stderr
    )
    nothing = cluster.cli("rerun", "job", new, "--failed", "--json")
    assert nothing.returncode == 0 and nothing.stdout == ""
    assert f"job {new} succeeded: it has no failed datums; nothing was done" in nothing.stderr
    assert len(await jobs_of(cluster, "copies")) == 2

    # The next commit's job skips against the rerun, which did every datum.
    await commit(cluster, "letters", {"/f": b"fff"})
    latest = (await wait_job_done(cluster, "copies", count=3))[0]
    assert (latest.data_processed, latest.data_skipped) == (1, 5), latest
    await no_planner_dead_letters(cluster)


async def test_rerun_refusals_name_the_cause(cluster: Cluster, tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    await put_files(cluster, "held-in", {"/x": b"x"})
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "held"},
            "input": {"pfs": {"repo": "held-in", "glob": "/*"}},
            # Waits, at most 60 s, until the test removes the hold file.
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    f"i=0; while [ -e {hold} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done;"
                    " cp /pfs/held-in/* /pfs/out/",
                ]
            },
        },
    )

    def refused(target: str, *extra: str) -> str:
        result = cluster.cli("rerun", "job", target, *extra, check=False)
        assert result.returncode == 1, result
        assert result.stdout == ""
        return result.stderr

    assert "pipeline nowhere does not exist" in refused("nowhere@0123", "--failed")
    assert "job held@0123 does not exist" in refused("held@0123", "--failed")
    assert "expected PIPELINE@JOB" in refused("held", "--failed")

    async def running() -> str:
        jobs = await jobs_of(cluster, "held")
        return jobs[0].id if jobs and jobs[0].state == "running" else ""

    first = await eventually(running, what="the held job to run")
    assert "`--failed` runs the job's failed datums again" in refused(f"held@{first}")
    assert (
        f"job held@{first} is running: wait for it to end (`datumflow wait job held@{first}`)"
        in refused(f"held@{first}", "--failed")
    )
    hold.unlink()
    [job] = await wait_job_done(cluster, "held")
    assert job.state == "success"
    nothing = cluster.cli("rerun", "job", f"held@{first}", "--failed")
    assert "succeeded: it has no failed datums; nothing was done" in nothing.stderr
    listed = json.loads(cluster.cli("list", "job", "-p", "held", "--json").stdout)
    assert [j["id"] for j in listed] == [first]


async def test_a_killed_job_reruns_what_it_never_finished(cluster: Cluster, tmp_path: Path) -> None:
    go = tmp_path / "go"
    await put_files(cluster, "timed-in", {"/a": b"a", "/b": b"b", "/s1": b"s"})
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "timed"},
            "input": {"pfs": {"repo": "timed-in", "glob": "/*"}},
            # Files named s* wait for the test's go (60 s at most); the others run at once.
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    f'n=$(ls /pfs/timed-in); i=0; case $n in s*) while [ ! -e "{go}" ]'
                    " && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done;; esac;"
                    " cp /pfs/timed-in/* /pfs/out/",
                ]
            },
            "parallelism_spec": {"constant": 1},
            "job_timeout": "4s",
        },
    )
    [killed] = await wait_job_done(cluster, "timed", timeout=60)
    assert killed.state == "killed", killed
    assert killed.data_failed == 0 and killed.data_processed < 3
    go.touch()
    # A request about another job of that id (the pipeline deleted and made anew since) is
    # dropped by the planner; the real one goes after it.
    async with cluster.api() as api:
        stale = RerunRequest(pipeline="timed", job=killed.id, created=killed.created - 60)
        await api.broker.publish(subjects.rerun("timed"), stale, msg_id="stale")
    await eventually(
        lambda: f"rerun of timed@{killed.id} dropped: no such job" in cluster.log("planner"),
        what="the planner to drop the stale request",
    )
    shown = json.loads(
        cluster.cli("rerun", "job", f"timed@{killed.id}", "--failed", "--json").stdout
    )
    rerun = (await wait_job_done(cluster, "timed", count=2))[0]
    assert shown == {
        "pipeline": "timed",
        "job": killed.id,
        "new_job": rerun.id,
        "rerun": 3 - killed.data_processed,
        "carried": killed.data_processed,
    }
    assert rerun.state == "success" and rerun.rerun_of == killed.id, rerun.reason
    assert (rerun.data_processed, rerun.data_skipped) == (
        3 - killed.data_processed,
        killed.data_processed,
    )
    assert await output_files(cluster, "timed") == {"/a": b"a", "/b": b"b", "/s1": b"s"}
    assert len(await jobs_of(cluster, "timed")) == 2
    await no_planner_dead_letters(cluster)


async def test_a_commit_before_the_rerun_wins(cluster: Cluster, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "y").touch()
    marks = tmp_path / "marks"
    marks.mkdir()
    await put_files(cluster, "raced-in", {"/x": b"x", "/y": b"y"})
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "raced"},
            "input": {"pfs": {"repo": "raced-in", "glob": "/*"}},
            "transform": {"cmd": copy_unless_broken("raced-in", marks, broken)},
            "datum_tries": 1,
        },
    )
    [failed] = await wait_job_done(cluster, "raced")
    assert failed.state == "failure"
    (broken / "y").unlink()
    # A commit lands first: its job runs on the newer inputs, and the rerun of the older job is
    # refused, whether the planner has planned that commit already (not the newest) or plans it
    # while the rerun waits in line behind it (moved on).
    await commit(cluster, "raced-in", {"/z": b"z"})
    async with cluster.api() as api:
        with pytest.raises(RerunRefused) as refused:
            await rerun_failed(broker=api.broker, store=api.store, pipeline="raced", job=failed.id)
    assert re.search(
        rf"job raced@{failed.id} is not the newest job of pipeline raced"
        rf"|pipeline raced moved on before the rerun of raced@{failed.id} started",
        str(refused.value),
    ), refused.value
    jobs = await wait_job_done(cluster, "raced", count=2)
    assert [j.rerun_of for j in jobs] == ["", ""]
    assert jobs[0].state == "success" and jobs[0].data_processed == 3
    assert len(await jobs_of(cluster, "raced")) == 2


async def no_planner_dead_letters(cluster: Cluster) -> None:
    """Rerun requests travel in the commit stream: the consumer that records external commits
    must pass them by, not dead-letter them."""
    assert cluster.settings is not None
    nc = await nats.connect(cluster.settings.nats_url)
    try:
        with pytest.raises(nats.js.errors.NotFoundError):
            await nc.jetstream().get_last_msg(subjects.DEAD_STREAM, subjects.dead("planner"))
    finally:
        await nc.close()


async def test_a_planner_consumer_of_an_older_datumflow_is_brought_up_to_date(
    nats_server: EmbeddedServer,
) -> None:
    """Streams and planner consumers made before reruns existed take rerun requests in place."""
    spec = load_spec(
        b'{"pipeline": {"name": "p"}, "input": {"pfs": {"repo": "r", "glob": "/*"}},'
        b' "transform": {"cmd": ["true"]}}',
        source="p.json",
    )
    broker = await connect(settings=Settings(nats_url=nats_server.url), name="test")
    try:
        old_stream = StreamConfig(name=subjects.COMMITS_STREAM, subjects=[subjects.COMMITS_ALL])
        await broker.js.add_stream(old_stream)
        old = dataclasses.replace(
            planner_consumer_config(spec), filter_subjects=[subjects.commit("r")]
        )
        await broker.js.add_consumer(subjects.COMMITS_STREAM, old)
        await ensure_topology(broker)
        stream = await broker.js.stream_info(subjects.COMMITS_STREAM)
        assert stream.config.subjects == [subjects.COMMITS_ALL, subjects.RERUNS_ALL]
        await ensure_rerun_subject(broker, spec)
        name = subjects.planner_consumer("p")
        consumer = await broker.js.consumer_info(subjects.COMMITS_STREAM, name)
        assert consumer.config.filter_subjects == [subjects.commit("r"), subjects.rerun("p")]
    finally:
        await broker.close()
