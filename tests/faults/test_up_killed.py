"""`datumflow up` killed outright (SIGKILL, the OOM killer): nothing it started may live on.

Left running, its nats-server would hold the JetStream store directory of the state directory, and
its functions would work on beside the ones a new `datumflow up` starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from datumflow.runtime.embedded import read_instance


def _started_by(home: Path) -> dict[int, str]:
    """pid → command line of every process of this state directory (by its config or HOME)."""
    found = {}
    marker = f"DATUMFLOW_HOME={home}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z":
            continue
        if str(home).encode() in argv or marker in environ:
            found[int(proc.name)] = argv.replace(b"\0", b" ").decode(errors="replace")
    return found


@pytest.fixture
def killed_up(tmp_path: Path) -> Iterator[tuple[Path, dict[int, str]]]:
    """A `datumflow up` with its embedded broker, SIGKILLed once its functions run. Yields the
    state directory and what ran under it at the time."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
    env["DATUMFLOW_HOME"] = str(home)
    home.mkdir()
    with open(tmp_path / "up.log", "ab") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "datumflow.cli.main", "up"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    before: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            instance = read_instance(home)
            before = _started_by(home)
            running = " ".join(before.values())
            if instance is not None and "planner" in running and "committer" in running:
                break
            time.sleep(0.1)
        assert "nats-server" in " ".join(before.values()), before
        up.send_signal(signal.SIGKILL)
        up.wait()
        yield home, before
    finally:
        for pid in _started_by(home):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _survivors(home: Path, words: tuple[str, ...], *, within: float) -> dict[int, str]:
    deadline = time.monotonic() + within
    while True:
        left = {p: c for p, c in _started_by(home).items() if any(w in c for w in words)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_the_embedded_broker_stops_with_datumflow_up(killed_up) -> None:  # type: ignore[no-untyped-def]
    home, _ = killed_up
    assert not _survivors(home, ("nats-server",), within=15)


def test_the_functions_stop_with_datumflow_up(killed_up) -> None:  # type: ignore[no-untyped-def]
    home, before = killed_up
    assert "planner" in " ".join(before.values())
    left = _survivors(home, ("planner", "committer", "ingest", "worker"), within=15)
    assert not left, left
