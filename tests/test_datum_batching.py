"""transform.datum_batching end to end: user code started once per worker, looping on next datum,
against a real `datumflow up` (one for the module; each test has its own repo and pipeline)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    Cluster,
    create_pipeline,
    dead,
    eventually,
    jobs_of,
    output_files,
    put_files,
    shared_cluster,
    wait_job_done,
)

pytestmark = pytest.mark.asyncio

NEXT_DATUM = str(Path(sys.executable).parent / "datumflow-next-datum")

# The user code: loads once (marks its start), then loops on next_datum. What a datum's content
# says it does: "fail" reports the datum failed, "exit" exits 4 with the datum in hand, "hang"
# hangs; anything else is uppercased into /pfs/out. While $MARKS/hold exists, the eleventh datum
# of a process waits (naming itself in $MARKS/holding) until it is gone.
CODE = """
import os, sys, time
from pathlib import Path
from datumflow.batching import next_datum

marks = Path(os.environ["MARKS"])
me = open("/proc/self/stat").read().split()[0]  # our pid as the test sees it
with open(marks / "starts", "a") as f:
    f.write(f"{me}\\n")
error = ""
count = 0
while (env := next_datum(error=error)) is not None:
    error = ""
    count += 1
    src = Path(env["nums"])
    data = src.read_text()
    with open(marks / "runs", "a") as f:
        f.write(src.name + "\\n")
    assert not os.listdir(os.environ["PFS"] + "/out"), "out is not empty"
    if data == "fail":
        error = "cannot take " + src.name
        continue
    if data == "exit":
        print("giving up on", src.name, flush=True)
        sys.exit(4)
    if data == "hang":
        (marks / "hung").write_text(me)
        time.sleep(1000)
    if count == 11 and (marks / "hold").exists():
        (marks / "holding").write_text(src.name)
        while (marks / "hold").exists():
            time.sleep(0.02)
    Path(os.environ["PFS"], "out", src.name).write_text(data.upper())
(marks / "bye").write_text(me)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with shared_cluster(tmp_path_factory.mktemp("batching-e2e"), DATUMFLOW_ACK_WAIT="2") as shared:
        yield shared


def batching_spec(name: str, repo: str, marks: Path, **fields: object) -> dict:
    code = marks.parent / "code.py"
    code.write_text(CODE)
    transform = {
        "cmd": [sys.executable, str(code)],
        "env": {"MARKS": str(marks)},
        "datum_batching": True,
    }
    transform.update(fields.pop("transform", {}))  # type: ignore[call-overload]
    return {
        "pipeline": {"name": name},
        "input": {"pfs": {"repo": repo, "glob": "/*", "name": "nums"}},
        "transform": transform,
        **fields,
    }


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def runs(marks: Path) -> list[str]:
    return sorted(lines(marks / "runs"))


def datums_of(cluster: Cluster, target: str) -> list[dict]:
    return json.loads(cluster.cli("list", "datum", target, "--json").stdout)


def states(cluster: Cluster, pipeline: str, job: str) -> dict[str, str]:
    return {d["files"][0]["path"]: d["state"] for d in datums_of(cluster, f"{pipeline}@{job}")}


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    path = tmp_path / "marks"
    path.mkdir()
    return path


async def test_one_process_runs_every_datum(cluster: Cluster, tmp_path: Path, marks: Path) -> None:
    files = {f"/f{i:02d}": f"datum {i}".encode() for i in range(36)}
    await put_files(cluster, "many", files)
    create_pipeline(
        cluster, tmp_path, batching_spec("upper", "many", marks, parallelism_spec={"constant": 1})
    )
    [job] = await wait_job_done(cluster, "upper")
    assert job.state == "success", job.reason
    assert (job.data_total, job.data_processed, job.data_failed) == (36, 36, 0)
    assert await output_files(cluster, "upper") == {p: d.upper() for p, d in files.items()}
    assert runs(marks) == sorted(p.lstrip("/") for p in files)
    assert len(lines(marks / "starts")) == 1  # loaded once, for every datum


async def test_a_shell_loop_on_the_cli_command(cluster: Cluster, tmp_path: Path) -> None:
    files = {f"/s{i}": f"{i}\n".encode() for i in range(5)}
    await put_files(cluster, "shelled", files)
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "shelly"},
            "input": {"pfs": {"repo": "shelled", "glob": "/*"}},
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    f'while vars=$("{sys.executable}" -m datumflow.cli.main next datum);'
                    ' do eval "$vars"; cp "$shelled" "$PFS/out/$(basename "$shelled").copy"; done;'
                    f" [ $? -eq 3 ] || exit 1",
                ],
                "datum_batching": True,
            },
        },
    )
    [job] = await wait_job_done(cluster, "shelly")
    assert job.state == "success", job.reason
    assert await output_files(cluster, "shelly") == {f"{p}.copy": d for p, d in files.items()}


async def test_a_shell_loop_on_the_sh_client(cluster: Cluster, tmp_path: Path, marks: Path) -> None:
    # `datumflow-next-datum` as found on the PATH the worker gives the code: its sh client, which
    # reports a failure with a message of two lines.
    files = {f"/s{i}": f"{i}\n".encode() for i in range(6)} | {"/bad": b"fail\n"}
    await put_files(cluster, "shin", files)
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "shclient"},
            "input": {"pfs": {"repo": "shin", "glob": "/*"}},
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    "err=; while"
                    ' if [ -n "$err" ]; then vars=$(datumflow-next-datum --error "$err");'
                    ' else vars=$(datumflow-next-datum); fi; do err=; eval "$vars";'
                    ' if [ "$(cat "$shin")" = fail ]; then err="cannot take\nthis one";'
                    ' else cp "$shin" "$PFS/out/"; fi;'
                    f' head -n 1 "$(command -v datumflow-next-datum)" >> {marks}/clients;'
                    " done; [ $? -eq 3 ] || exit 1",
                ],
                "datum_batching": True,
            },
            "datum_tries": 1,
        },
    )
    [job] = await wait_job_done(cluster, "shclient")
    assert job.state == "failure"
    assert (job.data_total, job.data_processed, job.data_failed) == (7, 6, 1)
    assert "the user code reported the datum failed: cannot take\nthis one" in job.reason
    assert states(cluster, "shclient", job.id) == {
        p: "failed" if p == "/bad" else "success" for p in files
    }
    assert lines(marks / "clients") == ["#!/bin/sh"] * len(files)


async def test_a_datum_whose_caller_is_gone_goes_to_the_next_call(
    cluster: Cluster, tmp_path: Path
) -> None:
    # A request on the pipes from a caller gone before its answer (no reply pipe, no process):
    # the datum it would have got goes to the next call instead of passing, unrun, on that
    # call's report.
    files = {f"/g{i}": f"{i}\n".encode() for i in range(3)}
    await put_files(cluster, "ghosts", files)
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "ghosted"},
            "input": {"pfs": {"repo": "ghosts", "glob": "/*"}},
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    'd=$(dirname "$(dirname "$(command -v datumflow-next-datum)")");'
                    " printf '2147483646 done\\n' > \"$d/next.req\";"
                    ' while vars=$(datumflow-next-datum); do eval "$vars";'
                    ' cp "$ghosts" "$PFS/out/"; done; [ $? -eq 3 ] || exit 1',
                ],
                "datum_batching": True,
            },
            "parallelism_spec": {"constant": 1},
        },
    )
    [job] = await wait_job_done(cluster, "ghosted")
    assert job.state == "success", job.reason
    assert await output_files(cluster, "ghosted") == files


async def test_a_datum_reported_failed(cluster: Cluster, tmp_path: Path, marks: Path) -> None:
    files = {"/a": b"a", "/bad": b"fail", "/c": b"c"}
    await put_files(cluster, "reported", files)
    create_pipeline(cluster, tmp_path, batching_spec("reporting", "reported", marks, datum_tries=2))
    [job] = await wait_job_done(cluster, "reporting")
    assert job.state == "failure"
    assert (job.data_total, job.data_processed, job.data_failed) == (3, 2, 1)
    assert "the user code reported the datum failed: cannot take bad" in job.reason
    assert runs(marks) == ["a", "bad", "bad", "c"]  # datum_tries attempts of the failed one
    assert len(lines(marks / "starts")) == 1  # reporting a failure keeps the code running
    assert states(cluster, "reporting", job.id) == {
        "/a": "success",
        "/bad": "failed",
        "/c": "success",
    }


async def test_the_code_exiting_fails_its_datum_and_restarts(
    cluster: Cluster, tmp_path: Path, marks: Path
) -> None:
    files = {f"/f{i}": f"{i}".encode() for i in range(6)} | {"/quit": b"exit"}
    await put_files(cluster, "exits", files)
    recovered = marks / "recovered"
    spec = batching_spec(
        "exiting",
        "exits",
        marks,
        datum_tries=1,
        transform={"err_cmd": ["sh", "-c", f'ls "$PFS/nums" >> {recovered}; exit 1']},
    )
    create_pipeline(cluster, tmp_path, spec)
    [job] = await wait_job_done(cluster, "exiting")
    assert job.state == "failure"
    assert (job.data_total, job.data_processed, job.data_failed) == (7, 6, 1)
    assert "the user code exited with code 4: giving up on quit" in job.reason
    assert lines(recovered) == ["quit"]  # err_cmd ran, in the failed datum's layout
    assert runs(marks) == sorted(["quit", *(p.lstrip("/") for p in files if p != "/quit")])
    starts = len(lines(marks / "starts"))
    assert starts in (1, 2)  # restarted for the datums after it, if any came after it
    assert states(cluster, "exiting", job.id) == {
        p: "failed" if p == "/quit" else "success" for p in files
    }


async def test_datum_timeout_kills_the_hung_datum_alone(
    cluster: Cluster, tmp_path: Path, marks: Path
) -> None:
    files = {f"/f{i}": f"{i}".encode() for i in range(5)} | {"/stuck": b"hang"}
    await put_files(cluster, "hangs", files)
    create_pipeline(
        cluster,
        tmp_path,
        batching_spec("hanging", "hangs", marks, datum_tries=1, datum_timeout="1s"),
    )
    [job] = await wait_job_done(cluster, "hanging")
    assert job.state == "failure"
    assert (job.data_total, job.data_processed, job.data_failed) == (6, 5, 1)
    assert "ran longer than datum_timeout (1s) and was killed" in job.reason
    assert states(cluster, "hanging", job.id) == {
        p: "failed" if p == "/stuck" else "success" for p in files
    }
    await eventually(lambda: dead(int((marks / "hung").read_text())), what="the hung code's end")


async def test_worker_killed_mid_batch_redoes_only_what_was_not_done(
    cluster: Cluster, tmp_path: Path, marks: Path
) -> None:
    files = {f"/f{i:02d}": f"{i}".encode() for i in range(21)}
    (marks / "hold").touch()
    await put_files(cluster, "crashes", files)
    create_pipeline(
        cluster,
        tmp_path,
        batching_spec("crashing", "crashes", marks, datum_set_spec={"number": 40}),
    )
    # The whole input in one set: ten datums reported done, the eleventh in hand. Once the ten
    # are counted, kill the worker.
    holding = marks / "holding"
    held = await eventually(
        lambda: holding.read_text() if holding.exists() else "", what="the held datum"
    )

    async def counted() -> bool:
        jobs = await jobs_of(cluster, "crashing")
        return bool(jobs) and jobs[0].data_processed == 10

    await eventually(counted, what="ten datums counted")
    [pid] = cluster.worker_pids("crashing")
    os.kill(pid, signal.SIGKILL)
    # Released once its worker is gone (its code goes with it), for the code started next.
    await eventually(lambda: dead(pid), what="the killed worker's end")
    (marks / "hold").unlink()

    [job] = await wait_job_done(cluster, "crashing", timeout=60)
    assert job.state == "success", job.reason
    assert (job.data_total, job.data_processed, job.data_failed) == (21, 21, 0)
    assert await output_files(cluster, "crashing") == {p: d.upper() for p, d in files.items()}
    ran = runs(marks)
    # The datum in hand ran twice; every other, the ten reported done before the kill among
    # them, once.
    assert sorted(set(ran)) == sorted(p.lstrip("/") for p in files)
    assert [name for name in set(ran) if ran.count(name) > 1] == [held]
    assert len(ran) == len(files) + 1


async def test_a_stopping_worker_tells_the_code_there_are_no_more(
    cluster: Cluster, tmp_path: Path, marks: Path
) -> None:
    await put_files(cluster, "stops", {"/a": b"a", "/b": b"b"})
    create_pipeline(cluster, tmp_path, batching_spec("stopping", "stops", marks))
    [job] = await wait_job_done(cluster, "stopping")
    assert job.state == "success", job.reason
    [code] = lines(marks / "starts")
    assert not (marks / "bye").exists()  # between datums, the code waits in next_datum
    # SIGTERM, as a pod's worker gets it: next_datum returns None, and the code ends its loop.
    [pid] = cluster.worker_pids("stopping")
    os.kill(pid, signal.SIGTERM)
    await eventually(lambda: (marks / "bye").exists(), what="the code's end of loop")
    assert (marks / "bye").read_text() == code
    await eventually(lambda: dead(int(code)), what="the code's exit")


async def test_next_datum_outside_a_worker_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DF_BATCH_SOCKET"}
    result = await asyncio.to_thread(
        subprocess.run, [NEXT_DATUM], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "$DF_BATCH_SOCKET is not set" in result.stderr
    assert "transform.datum_batching" in result.stderr


async def test_the_code_as_another_user_reaches_its_socket(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("run as root: only then is there another user to run user code as")
    # The client from a Python that user can run (this one may live in a home of root's), and
    # this checkout's datumflow package, all the client needs besides the standard library.
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if python is None:
        pytest.skip("no system python3 for the user code to run the client with")
    cluster = make_cluster(DATUMFLOW_USER_CODE_USER="nobody")
    files = {f"/u{i}": b"x" for i in range(4)}
    await put_files(cluster, "users", files)
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "switched"},
            "input": {"pfs": {"repo": "users", "glob": "/*"}},
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    # Every other call by the sh client (the pipes), the rest by the Python
                    # one (the socket).
                    "n=0; while if [ $((n % 2)) -eq 0 ]; then vars=$(datumflow-next-datum);"
                    f" else vars=$({python} -m datumflow.batching next); fi;"
                    ' do n=$((n + 1)); eval "$vars";'
                    ' echo "$(id -un) $(stat -c "%U %a" "$(dirname "$DF_BATCH_SOCKET")")'
                    ' $(stat -c %U "$(command -v datumflow-next-datum)")"'
                    ' > "/pfs/out/$(basename "$users")"; done',
                ],
                "env": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                "datum_batching": True,
            },
        },
    )
    [job] = await wait_job_done(cluster, "switched")
    assert job.state == "success", job.reason
    # The code ran as nobody, and the directory of the socket, the pipes and the sh client is
    # nobody's alone.
    assert await output_files(cluster, "switched") == {
        p: b"nobody nobody 700 nobody\n" for p in files
    }
