"""The `datumflow` command as a user types it: `up --detach`, files in and out, bad input, `down`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


class Shell:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
        self.env["DATUMFLOW_HOME"] = str(home)

    def __call__(
        self, *args: str, stdin: bytes | None = None, ok: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            [sys.executable, "-m", "datumflow.cli.main", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            timeout=120,
            cwd=self.home.parent,
        )
        if ok and result.returncode != 0:
            raise AssertionError(f"datumflow {' '.join(args)}: {result.stderr.decode()}")
        if not ok:
            assert result.returncode != 0, f"datumflow {' '.join(args)} should have failed"
        return result


@pytest.fixture(scope="module")
def sh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shell]:
    # One instance for the module: starting one costs more than the commands each test runs.
    shell = Shell(tmp_path_factory.mktemp("cli") / "state")
    started = shell("up", "--detach")
    # It says where its web console is, with the token in the URL (docs/console.md).
    assert re.search(rb"console: http://127\.0\.0\.1:\d+/\?token=\S+", started.stdout), (
        started.stdout
    )
    try:
        assert os.stat(shell.home / "up.log").st_mode & 0o077 == 0  # it carries that URL too
        yield shell
    finally:
        # Not through `shell`: a test that already stopped it must not fail here.
        subprocess.run(
            [sys.executable, "-m", "datumflow.cli.main", "down"],
            env=shell.env,
            capture_output=True,
            timeout=120,
        )


def test_files_in_and_out(sh: Shell, tmp_path: Path) -> None:
    local = tmp_path / "photos"
    (local / "cats").mkdir(parents=True)
    (local / "cats" / "tom.txt").write_text("tom\n")
    (local / "dog.txt").write_text("rex\n")
    sh("create", "repo", "images")
    sh("put", "file", "images@master:/pets", "-f", str(local), "-r")
    sh("put", "file", "images@master:/notes/readme.txt", "-f", "-", stdin=b"from stdin\n")

    top = json.loads(sh("list", "file", "images@master", "--json").stdout)
    assert top == [
        {"path": "/notes/", "type": "dir", "size": 11},
        {"path": "/pets/", "type": "dir", "size": 8},
    ]
    pets = json.loads(sh("list", "file", "images@master:/pets", "--json").stdout)
    assert [e["path"] for e in pets] == ["/pets/cats/", "/pets/dog.txt"]
    assert sh("get", "file", "images@master:/pets/cats/tom.txt").stdout == b"tom\n"
    out = tmp_path / "readme.txt"
    sh("get", "file", "images@master:/notes/readme.txt", "-o", str(out))
    assert out.read_bytes() == b"from stdin\n"

    commits = json.loads(sh("list", "commit", "images@master", "--json").stdout)
    assert len(commits) == 2 and commits[0]["parent"] == commits[1]["id"]
    inspected = json.loads(sh("inspect", "commit", f"images@{commits[1]['id']}", "--json").stdout)
    assert inspected["files"] == 2
    repos = json.loads(sh("list", "repo", "--json").stdout)
    assert "images" in [r["name"] for r in repos]

    schema = json.loads(sh("schema", "commit-event").stdout)
    assert "CommitEvent" in json.dumps(schema)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("put", "file", "images@master:/../etc/passwd", "-f", "-"), "'..'"),
        (("put", "file", "nosuch@master:/x", "-f", "-"), "repo nosuch does not exist"),
        (("list", "file", "images@"), "nothing after '@'"),
        (("get", "file", "images@master"), "expected REPO@BRANCH:/PATH"),
        (("get", "file", "images@master:/missing"), "no such file"),
        (("inspect", "job", "nojob"), "expected PIPELINE@JOB"),
        (("create", "pipeline", "-f", "/nonexistent.json"), "No such file"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    sh: Shell, args: tuple[str, ...], message: str
) -> None:
    args = tuple(a.replace("images", "fixed") for a in args)
    if b"fixed" not in sh("list", "repo").stdout:
        sh("create", "repo", "fixed")
        sh("put", "file", "fixed@master:/a.txt", "-f", "-", stdin=b"a\n")
    result = sh(*args, stdin=b"data\n", ok=False)
    assert message.replace("images", "fixed") in result.stderr.decode()
    # Nothing changed: one commit, one file.
    assert len(json.loads(sh("list", "commit", "fixed@master", "--json").stdout)) == 1
    assert json.loads(sh("list", "file", "fixed@master", "--json").stdout) == [
        {"path": "/a.txt", "type": "file", "size": 2}
    ]


def test_a_bad_spec_is_refused_with_the_field(sh: Shell, tmp_path: Path) -> None:
    sh("create", "repo", "specs")
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "pipeline: {name: edges}\ninput: {pfs: {repo: specs, glob: '/*'}}\ntransform: {cmd: [x]}\ndatum_tries: -1\n"
    )
    result = sh("create", "pipeline", "-f", str(spec), ok=False)
    assert "datum_tries: must be >= 1" in result.stderr.decode()
    missing = tmp_path / "missing.yaml"
    missing.write_text(
        "pipeline: {name: edges}\ninput: {pfs: {repo: nope, glob: '/*'}}\ntransform: {cmd: [x]}\n"
    )
    assert (
        "repo nope does not exist"
        in sh("create", "pipeline", "-f", str(missing), ok=False).stderr.decode()
    )
    assert json.loads(sh("list", "pipeline", "--json").stdout) == []
    assert "edges" not in [r["name"] for r in json.loads(sh("list", "repo", "--json").stdout)]


def test_commands_say_when_nothing_runs(tmp_path: Path) -> None:
    shell = Shell(tmp_path / "empty")
    result = shell("list", "repo", ok=False)
    assert "datumflow up" in result.stderr.decode()
