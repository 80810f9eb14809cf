"""Running user code on one datum: the /pfs layout, the process, its logs and its time limit.

Pachyderm code hard-codes `/pfs/<input>/...` and `/pfs/out`. Three ways to give it that:
- namespace: each datum's process gets a private mount namespace in which the datum's directory is
  bind-mounted at /pfs (Linux, as root). Parallel workers on one machine never see each other.
- direct: the worker owns /pfs outright (one worker per pod, /pfs an emptyDir).
- env: the layout lives in a scratch directory named by $PFS (and each input's variable), for
  machines where neither is possible; code must then read the variables.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

LOG_CAP = 1 << 20
"""Bytes of a datum's output kept in its log; the rest is counted and dropped."""

_CLONE_NEWNS = 0x00020000
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_PR_SET_PDEATHSIG = 1

# Variables of datumflow itself, the object store or the broker: user code never sees them.
_SECRET_PREFIXES = ("DATUMFLOW_", "AWS_", "NATS_", "KUBERNETES_")


class Outcome(msgspec.Struct, kw_only=True):
    returncode: int | None
    """None when the process was killed for its timeout."""
    log: bytes
    dropped: int = 0
    elapsed: float


def _bind_pfs(source: bytes) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def enter() -> None:
        # Runs in the child between fork and exec: a mount namespace of its own, /pfs inside it.
        _die_with_parent(libc)
        if libc.unshare(_CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "making / private")
        if libc.mount(source, b"/pfs", None, _MS_BIND | _MS_REC, None) != 0:
            raise OSError(ctypes.get_errno(), "bind-mounting the datum at /pfs")

    return enter


def _die_with_parent(libc: ctypes.CDLL) -> None:
    # A worker killed with SIGKILL must not leave its user code running on a datum that another
    # worker is about to redo.
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _orphan_guard() -> None:
    _die_with_parent(ctypes.CDLL(None, use_errno=True))


def choose_mode(wanted: str) -> str:
    """The layout this machine can give; `auto` tries a namespace, then falls back to env."""
    if wanted in ("direct", "env"):
        return wanted
    try:
        Path("/pfs").mkdir(exist_ok=True)
        subprocess.run(["true"], preexec_fn=_bind_pfs(b"/tmp"), check=True)
    except (OSError, subprocess.SubprocessError):
        if wanted == "namespace":
            raise RuntimeError(
                "pfs_mode=namespace needs Linux mount namespaces (run as root, or with"
                " CAP_SYS_ADMIN); use pfs_mode=env instead"
            ) from None
        return "env"
    return "namespace"


def user_environment(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SECRET_PREFIXES)}
    env.update(extra)
    return env


async def run(
    cmd: list[str],
    *,
    stdin: bytes,
    env: dict[str, str],
    layout: Path,
    mode: str,
    timeout: float | None,
    on_output: Callable[[bytes], Awaitable[None]] | None = None,
) -> Outcome:
    """Run `cmd` with the datum's layout; kill it and all its children at `timeout`."""
    preexec = _bind_pfs(str(layout).encode()) if mode == "namespace" else _orphan_guard
    cwd = "/pfs" if mode in ("namespace", "direct") else str(layout)
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd if mode != "namespace" else None,
            start_new_session=True,
            preexec_fn=preexec,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        message = f"could not start {cmd[0]!r}: {exc}\n".encode()
        return Outcome(returncode=127, log=message, elapsed=time.monotonic() - started)
    log = bytearray()
    dropped = 0

    async def pump() -> None:
        nonlocal dropped
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            if on_output is not None and len(log) < LOG_CAP:
                await on_output(chunk[: LOG_CAP - len(log)])
            room = LOG_CAP - len(log)
            log.extend(chunk[: max(room, 0)])
            dropped += max(len(chunk) - max(room, 0), 0)

    async def feed() -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(stdin)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the program did not read its stdin: its choice
        finally:
            proc.stdin.close()

    readers = asyncio.gather(pump(), feed())
    try:
        await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=timeout)
        returncode: int | None = proc.returncode
    except TimeoutError:
        returncode = None
    finally:
        # The process group goes down with its leader: children that outlive it, or a process
        # that is still running because we were cancelled or timed out.
        _kill_group(proc.pid)
        await proc.wait()
    try:
        await asyncio.wait_for(readers, timeout=5)
    except TimeoutError:
        readers.cancel()
    if dropped:
        log.extend(f"\n[datumflow: {dropped} more bytes of output dropped]\n".encode())
    return Outcome(
        returncode=returncode, log=bytes(log), dropped=dropped, elapsed=time.monotonic() - started
    )


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
