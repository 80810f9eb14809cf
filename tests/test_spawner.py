"""The spawner's fast path keeps the sandbox's guarantees: each datum's process sees its own layout
at /pfs and the machine sees none of it, the user switch with no groups left, the environment as
given, the log cap, and no user code left running once its worker is killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from datumflow.functions.worker import sandbox
from datumflow.functions.worker import spawner as spawner_module
from datumflow.functions.worker.spawner import Spawner
from tests.helpers import HOST_PID, dead, eventually, reporting_pid

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="mount namespaces and user switches need root")


def _spawner(mode: str) -> Spawner:
    made = Spawner.create(mode=mode)
    if made is None:
        pytest.skip("no setpriv or no mount namespace here: the fast path is not used")
    return made


@pytest.fixture
def in_namespace() -> Iterator[Spawner]:
    made = _spawner("namespace")
    yield made
    made.close()


def _layout(root: Path, text: str) -> Path:
    (root / "in").mkdir(parents=True)
    (root / "in" / "file").write_text(text)
    (root / "out").mkdir()
    return root


async def _run(spawner: Spawner, layout: Path, cmd: list[str], **kw: object) -> sandbox.Outcome:
    return await sandbox.run(
        cmd,
        stdin=b"",
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        layout=layout,
        mode="namespace" if spawner.namespace else "env",
        timeout=20,
        spawner=spawner,
        **kw,  # type: ignore[arg-type]
    )


@needs_root
@pytest.mark.asyncio
async def test_each_datum_sees_its_own_layout_at_pfs(tmp_path: Path, in_namespace: Spawner) -> None:
    before = sorted(os.listdir("/pfs"))
    script = "cat /pfs/in/file; ls /pfs; echo made > /pfs/out/result; pwd"
    for name in ("first", "second"):
        layout = _layout(tmp_path / name, f"{name}\n")
        outcome = await _run(in_namespace, layout, ["sh", "-c", script])
        assert (outcome.returncode, outcome.log) == (0, f"{name}\nin\nout\n/pfs\n".encode())
        assert (layout / "out" / "result").read_text() == "made\n"
    # The machine's /pfs, and this thread's, never saw a datum.
    assert sorted(os.listdir("/pfs")) == before


@needs_root
@pytest.mark.asyncio
async def test_a_reused_layout_keeps_its_mount_only_after_a_user_who_cannot_mount(
    tmp_path: Path, in_namespace: Spawner
) -> None:
    layout = _layout(tmp_path / "d", "first\n")
    nobody = (65534, 65534)
    # Root's process mounts over /pfs/in: the next datum on the same layout must not see that.
    script = "mount -t tmpfs none /pfs/in && echo hidden > /pfs/in/file; cat /pfs/in/file"
    outcome = await _run(in_namespace, layout, ["sh", "-c", script])
    assert (outcome.returncode, outcome.log) == (0, b"hidden\n")
    (layout / "in" / "file").write_text("second\n")
    outcome = await _run(in_namespace, layout, ["cat", "/pfs/in/file"], run_as=nobody)
    assert outcome.log == b"second\n"
    # Kept after nobody's process: the layout's new content shows through the same mount.
    (layout / "in" / "file").write_text("third\n")
    outcome = await _run(in_namespace, layout, ["cat", "/pfs/in/file"], run_as=nobody)
    assert outcome.log == b"third\n"
    # The same path, another directory (a layout removed and made anew): mounted afresh.
    os.rename(layout, tmp_path / "old")
    layout = _layout(tmp_path / "d", "fourth\n")
    outcome = await _run(in_namespace, layout, ["cat", "/pfs/in/file"], run_as=nobody)
    assert outcome.log == b"fourth\n"


@needs_root
@pytest.mark.asyncio
async def test_a_reused_layout_keeps_its_mount_after_root_unless_root_mounted_something(
    tmp_path: Path, in_namespace: Spawner, monkeypatch: pytest.MonkeyPatch
) -> None:
    mounts: list[bytes] = []

    def counting(source: bytes) -> None:
        mounts.append(source)
        real(source)

    real = spawner_module._mount
    monkeypatch.setattr(spawner_module, "_mount", counting)
    layout = _layout(tmp_path / "d", "x\n")
    for _ in range(3):
        outcome = await _run(in_namespace, layout, ["cat", "/pfs/in/file"])
        assert outcome.log == b"x\n"
    assert len(mounts) == 1  # root mounted nothing: one mount served all three
    mounting = await _run(in_namespace, layout, ["sh", "-c", "mount -t tmpfs none /pfs/in"])
    assert mounting.returncode == 0
    after = await _run(in_namespace, layout, ["ls", "/pfs/in"])
    # The datum's input, not root's tmpfs, which the kept mount would have shown.
    assert after.log.decode().split()[0] == "file"
    assert len(mounts) == 2


@needs_root
@pytest.mark.asyncio
async def test_orphans_of_user_code_are_reaped_by_the_namespace_init(tmp_path: Path) -> None:
    spawner = _spawner("env")
    try:
        assert spawner.pids is not None
        for _ in range(5):  # each leaves a child behind, killed with its tree, then an orphan
            await _run(spawner, tmp_path, ["sh", "-c", "sleep 300 & echo started"])
        init = spawner.pids.reaper
        await eventually(
            lambda: not [p for p in _children(init)], timeout=10, what="the orphans reaped"
        )
    finally:
        spawner.close()


@needs_root
@pytest.mark.asyncio
async def test_a_daemon_left_by_a_datum_dies_before_the_next_datum(tmp_path: Path) -> None:
    """In the worker's PID namespace, what a datum's process leaves is killed when it ends: a
    daemon that left its session and let go of the output too, which no tree walk finds."""
    spawner = _spawner("env")
    try:
        assert spawner.pids is not None
        daemon = reporting_pid("daemon", "sleep 300")
        script = f"setsid {daemon} </dev/null >/dev/null 2>&1 & while [ ! -s daemon ]; do :; done"
        outcome = await _run(spawner, tmp_path, ["sh", "-c", script])
        assert outcome.returncode == 0
        left = int((tmp_path / "daemon").read_text())
        await _dies(left)  # at once: killed before the run returned
    finally:
        spawner.close()


def _children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{name}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(name))
    return found


@needs_root
@pytest.mark.asyncio
async def test_two_workers_at_once_each_see_their_own_pfs(tmp_path: Path) -> None:
    spawners = [_spawner("namespace"), _spawner("namespace")]
    try:
        layouts = [_layout(tmp_path / f"w{i}", f"worker {i}\n") for i in range(2)]
        outcomes = await asyncio.gather(
            *(
                _run(s, layout, ["sh", "-c", "sleep 0.3; cat /pfs/in/file"])
                for s, layout in zip(spawners, layouts, strict=True)
            )
        )
        assert [o.log for o in outcomes] == [b"worker 0\n", b"worker 1\n"]
    finally:
        for s in spawners:
            s.close()


@needs_root
@pytest.mark.asyncio
async def test_user_code_runs_as_its_user_with_no_groups(
    tmp_path: Path, in_namespace: Spawner
) -> None:
    layout = _layout(tmp_path / "d", "x\n")
    os.chown(layout / "out", 65534, 65534)
    outcome = await _run(
        in_namespace,
        layout,
        ["sh", "-c", "id -u; id -g; id -G; touch /pfs/out/mine; touch /pfs/in/theirs"],
        run_as=(65534, 65534),
    )
    lines = outcome.log.decode().splitlines()
    assert lines[:3] == ["65534", "65534", "65534"]
    assert "Permission denied" in lines[3]  # the inputs are not the user's to write
    assert (layout / "out" / "mine").stat().st_uid == 65534


@pytest.mark.asyncio
async def test_the_environment_is_exactly_the_one_given(tmp_path: Path) -> None:
    spawner = _spawner("env")
    try:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PACH_JOB_ID": "j1"}
        outcome = await sandbox.run(
            ["env"], stdin=b"", env=env, layout=tmp_path, mode="env", timeout=20, spawner=spawner
        )
        assert sorted(outcome.log.decode().splitlines()) == sorted(
            f"{k}={v}" for k, v in env.items()
        )
    finally:
        spawner.close()


@pytest.mark.asyncio
async def test_the_log_is_capped_and_stdin_is_given(tmp_path: Path) -> None:
    spawner = _spawner("env")
    try:
        outcome = await sandbox.run(
            ["sh", "-c", "cat; head -c 3000000 /dev/zero"],
            stdin=b"hello\n",
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            layout=tmp_path,
            mode="env",
            timeout=20,
            spawner=spawner,
        )
        assert outcome.returncode == 0
        assert outcome.log.startswith(b"hello\n")
        assert outcome.dropped == 3_000_006 - sandbox.LOG_CAP
        assert len(outcome.log) < sandbox.LOG_CAP + 100
    finally:
        spawner.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("pid_namespace", [True, False], ids=["pid-namespace", "setpriv"])
async def test_user_code_dies_with_its_worker(tmp_path: Path, pid_namespace: bool) -> None:
    """A worker killed with SIGKILL leaves no user code running: its PID namespace's init sees
    its end and the namespace goes, with a daemon that left the session too; without one, the
    parent-death signal that `setpriv` sets."""
    worker = textwrap.dedent(
        f"""
        import asyncio, os
        from pathlib import Path
        from datumflow.functions.worker import sandbox
        from datumflow.functions.worker.spawner import Spawner

        spawner = Spawner.create(mode="env", pid_namespace={pid_namespace})
        assert spawner is not None and (spawner.pids is not None) == {pid_namespace and ROOT}
        asyncio.run(sandbox.run(
            ["sh", "-c", "setsid {reporting_pid("daemon", "sleep 301")} & {HOST_PID};"
             " echo $pid > self.part && mv self.part self; exec sleep 300"],
            stdin=b"", env=dict(PATH=os.environ["PATH"]), layout=Path("{tmp_path}"),
            mode="env", timeout=None, spawner=spawner,
        ))
        """
    )
    _spawner("env").close()  # skips where there is no fast path
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", worker, cwd=tmp_path)
    try:
        await eventually(
            lambda: (tmp_path / "self").exists() and (tmp_path / "daemon").exists(), timeout=20
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    user_code = int((tmp_path / "self").read_text())
    await eventually(lambda: dead(user_code), timeout=10, what="the user code to die")
    if pid_namespace and ROOT:
        daemon = int((tmp_path / "daemon").read_text())
        await eventually(lambda: dead(daemon), timeout=10, what="the daemon to die")
    else:
        _kill_left(int((tmp_path / "daemon").read_text()))


@pytest.mark.asyncio
async def test_a_start_cancelled_midway_leaves_nothing_running(tmp_path: Path) -> None:
    """Cancelled while the spawner's thread starts the process: it is killed all the same, and
    the next datum's process still starts."""
    spawner = _spawner("env")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    try:
        for attempt in range(3):
            pidfile = tmp_path / f"pid{attempt}"
            run = asyncio.ensure_future(
                sandbox.run(
                    ["sh", "-c", f"{HOST_PID}; echo $pid > {pidfile}; exec sleep 300"],
                    stdin=b"",
                    env=env,
                    layout=tmp_path,
                    mode="env",
                    timeout=20,
                    spawner=spawner,
                )
            )
            await asyncio.sleep(0)  # it has the turn, and the thread is starting the process
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
            after = await sandbox.run(
                ["sh", "-c", "echo next"],
                stdin=b"",
                env=env,
                layout=tmp_path,
                mode="env",
                timeout=20,
                spawner=spawner,
            )
            assert (after.returncode, after.log) == (0, b"next\n")
            if pidfile.exists() and pidfile.read_text().strip():
                await _dies(int(pidfile.read_text()))
    finally:
        spawner.close()


def _kill_left(pid: int) -> None:
    """A process the test left: gone before the next test."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def _dies(pid: int) -> None:
    await eventually(lambda: dead(pid), timeout=10, what=f"process {pid} to die")
