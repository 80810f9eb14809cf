"""Live progress bars of `wait job`, `wait commit` and `put file -r`, with the real CLI under a
pseudo-terminal: the bar shows with its counts and an ETA; piped, or with --json, the output is
what it always was, with nothing extra."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    Cluster,
    create_pipeline,
    eventually,
    jobs_of,
    put_files,
    shared_cluster,
    wait_job_done,
)

pytestmark = pytest.mark.asyncio

ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with shared_cluster(tmp_path_factory.mktemp("progress-cli")) as shared:
        yield shared


def on_terminal(cluster: Cluster, *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run `datumflow ARGS` with stdout and stderr on a pseudo-terminal of 160 columns; its exit
    code and everything it wrote there, escape sequences and carriage returns left in."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    # What a terminal has, whatever the test's own environment says (rich reads these).
    env = {**cluster.env, "TERM": "xterm-256color"}
    for name in ("NO_COLOR", "COLUMNS", "LINES", "TTY_INTERACTIVE", "TTY_COMPATIBLE"):
        env.pop(name, None)
    process = subprocess.Popen(
        [*cluster.prefix, *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"datumflow {' '.join(args)} still runs after {timeout}s")
            ready, _, _ = select.select([master], [], [], min(left, 0.5))
            if not ready:
                continue
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: every end of the terminal's other side is closed
                break
            if not chunk:
                break
            out += chunk
        return process.wait(timeout=max(deadline - time.monotonic(), 1)), out.decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)


def plain(text: str) -> str:
    return ESCAPES.sub("", text).replace("\r", "")


def slow_spec(name: str, repo: str, seconds: float) -> dict:
    return {
        "pipeline": {"name": name},
        "input": {"pfs": {"repo": repo, "glob": "/*"}},
        "transform": {
            "cmd": ["sh", "-c", f"sleep {seconds}; cp /pfs/{repo}/* /pfs/out/"],
        },
        "parallelism_spec": {"constant": 1},
    }


async def test_wait_job_shows_a_bar_on_a_terminal_only(cluster: Cluster, tmp_path: Path) -> None:
    await put_files(cluster, "slow-in", {f"/{n}": n.encode() for n in "abcdef"})
    create_pipeline(cluster, tmp_path, slow_spec("slow", "slow-in", 0.3))
    [job] = await eventually(lambda: jobs_of(cluster, "slow"), what="the job of slow")
    target = f"slow@{job.id}"

    code, raw = on_terminal(cluster, "wait", "job", target)
    text = plain(raw)
    assert code == 0, text
    assert "━" in raw, text  # the bar itself
    assert re.search(rf"slow@{job.id[:12]} .*6/6 datums — success .*ETA", text), text
    assert text.rstrip().endswith(f"{target}: success"), text

    # A job that does not exist: the error alone, no bar.
    code, raw = on_terminal(cluster, "wait", "job", "slow@nope")
    assert code == 1 and "━" not in raw and "ETA" not in raw, raw
    assert plain(raw).strip() == "error: job slow@nope does not exist", raw
    # Piped: the one line it always printed, and nothing on stderr.
    piped = cluster.cli("wait", "job", target)
    assert (piped.stdout, piped.stderr) == (f"{target}: success\n", "")
    # --json on a terminal: the job as JSON and nothing else.
    code, raw = on_terminal(cluster, "wait", "job", target, "--json")
    assert code == 0 and "\x1b" not in raw and "━" not in raw and "ETA" not in raw, raw
    shown = json.loads(raw.replace("\r", ""))
    assert (shown["id"], shown["state"], shown["data_processed"]) == (job.id, "success", 6)


async def test_wait_commit_shows_every_job_downstream(cluster: Cluster, tmp_path: Path) -> None:
    await put_files(cluster, "chain-in", {f"/{n}": n.encode() for n in "abcd"})
    create_pipeline(cluster, tmp_path, slow_spec("first", "chain-in", 0.2))
    create_pipeline(cluster, tmp_path, slow_spec("second", "first", 0.1))

    code, raw = on_terminal(cluster, "wait", "commit", "chain-in@master")
    text = plain(raw)
    assert code == 0, text
    assert "━" in raw, text
    assert re.search(r"downstream .*2/2 jobs", text), text
    assert re.search(r"first@\w{12} .*4/4 datums — success", text), text
    assert re.search(r"second@\w{12} .*4/4 datums — success", text), text

    [first] = await wait_job_done(cluster, "first")
    [second] = await wait_job_done(cluster, "second")
    lines = f"first@{first.id}: success\nsecond@{second.id}: success\n"
    piped = cluster.cli("wait", "commit", "chain-in@master")
    assert (piped.stdout, piped.stderr) == ("", lines)
    as_json = cluster.cli("wait", "commit", "chain-in@master", "--json")
    assert [j["id"] for j in json.loads(as_json.stdout)] == [first.id, second.id]


async def test_wait_commit_on_a_branch_no_pipeline_reads(cluster: Cluster, tmp_path: Path) -> None:
    await put_files(cluster, "branch-in", {"/a": b"a"})
    create_pipeline(cluster, tmp_path, slow_spec("on-master", "branch-in", 0))
    await wait_job_done(cluster, "on-master")
    src = tmp_path / "b"
    src.write_bytes(b"b")
    cluster.cli("put", "file", "branch-in@dev:/b", "-f", str(src))
    # No job reads branch-in@dev: nothing to wait for, at once (it waited out --timeout).
    started = time.monotonic()
    done = cluster.cli("wait", "commit", "branch-in@dev", "--timeout", "10", check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), done
    assert time.monotonic() - started < 8
    assert len(await jobs_of(cluster, "on-master")) == 1


async def test_put_file_r_shows_files_and_bytes(cluster: Cluster, tmp_path: Path) -> None:
    local = tmp_path / "many"
    local.mkdir()
    for i in range(12):
        (local / f"f{i:02}").write_bytes(b"x" * 1024 * (i + 1))
    cluster.cli("create", "repo", "many")

    code, raw = on_terminal(cluster, "put", "file", "many@master:/t/", "-f", str(local), "-r")
    text = plain(raw)
    assert code == 0, text
    assert "━" in raw, text
    assert re.search(r"many@master:/t/ .*12/12 files, 78\.0KiB/78\.0KiB .*ETA", text), text
    assert re.search(r"many@\w+: 12 file\(s\)", text), text

    piped = cluster.cli("put", "file", "many@master:/u/", "-f", str(local), "-r")
    assert piped.stdout == ""
    assert re.fullmatch(r"many@\w+: 12 file\(s\)\n", piped.stderr), piped.stderr


async def test_put_file_r_refuses_a_file_it_cannot_read_by_name(
    cluster: Cluster, tmp_path: Path
) -> None:
    local = tmp_path / "with-lock"
    local.mkdir()
    (local / "a.txt").write_bytes(b"a")
    (local / ".#a.txt").symlink_to(local / "gone")  # an editor's lock: a link to nothing
    cluster.cli("create", "repo", "locked")
    put = cluster.cli("put", "file", "locked@master:/", "-f", str(local), "-r", check=False)
    assert put.returncode == 1, put
    assert f"{local / '.#a.txt'}: not a file that can be read; nothing was put" in put.stderr
    assert "Traceback" not in put.stderr
    listed = cluster.cli("list", "commit", "locked", check=False).stdout.strip().splitlines()
    assert listed[1:] == [], listed  # the header alone: no commit
