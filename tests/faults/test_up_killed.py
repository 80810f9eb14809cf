"""`datumflow up` killed outright (SIGKILL, the OOM killer): nothing it started may live on.

Left running, its nats-server would hold the JetStream store directory of the state directory, and
its functions would work on beside the ones a new `datumflow up` starts.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Cluster, wait_until

FUNCTIONS = ("nats-server", "planner", "committer")
"""What `datumflow up` runs once it has started: its broker and its functions."""


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
    up = Cluster(home=home, env=env, home_flag=False)
    try:
        up.start()
        before = wait_until(
            lambda: _started_by(home),
            until=lambda found: all(w in " ".join(found.values()) for w in FUNCTIONS),
            timeout=60,
            interval=0.1,
            what="datumflow up to start its broker and functions",
        )
        assert up.process is not None
        up.process.kill()
        up.process.wait()
        yield home, before
    finally:
        for pid in _started_by(home):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _none_survive(home: Path, words: tuple[str, ...], *, within: float) -> None:
    wait_until(
        lambda: {p: c for p, c in _started_by(home).items() if any(w in c for w in words)},
        until=lambda left: not left,
        timeout=within,
        interval=0.1,
        what=f"every process of {home} running {' or '.join(words)} to stop",
    )


def test_the_embedded_broker_stops_with_datumflow_up(killed_up) -> None:  # type: ignore[no-untyped-def]
    home, _ = killed_up
    _none_survive(home, ("nats-server",), within=15)


def test_the_functions_stop_with_datumflow_up(killed_up) -> None:  # type: ignore[no-untyped-def]
    home, before = killed_up
    assert "planner" in " ".join(before.values())
    _none_survive(home, ("planner", "committer", "ingest", "worker"), within=15)
