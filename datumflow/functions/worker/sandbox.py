"""Running user code on one datum: the /pfs layout, the process, its logs and its time limit.

Pachyderm code hard-codes `/pfs/<input>/...` and `/pfs/out`. Three ways to give it that:
- namespace: each datum's process gets a private mount namespace in which the datum's directory is
  bind-mounted at /pfs (Linux, as root). Parallel workers on one machine never see each other.
- direct: the worker owns /pfs outright (one worker per pod, /pfs an emptyDir).
- env: the layout lives in a scratch directory named by $PFS (and each input's variable), for
  machines where neither is possible; code must then read the variables.

At its time limit, or when it ends, the process and everything it started are killed by
`proctree.kill_tree`; in the worker's PID namespace (functions.worker.spawner), everything it left
there is killed by `proctree.kill_leftovers` once it has ended, whatever session it moved to.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from datumflow.errors import PermanentError
from datumflow.functions.worker.proctree import (
    kill_leftovers,
    kill_tree,
    pipe_holders,
    signal_quietly,
)
from datumflow.functions.worker.spawner import Running, Spawner

LOG_CAP = 1 << 20
"""Bytes of a datum's output kept in its log; the rest is counted and dropped."""

_CLONE_NEWNS = 0x00020000
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_PR_SET_PDEATHSIG = 1

# Variables of datumflow itself, the object store or the broker: user code never sees them.
_SECRET_PREFIXES = ("DATUMFLOW_", "AWS_", "NATS_", "KUBERNETES_", "PROMETHEUS_MULTIPROC_DIR")


class Outcome(msgspec.Struct, kw_only=True):
    returncode: int | None
    """None when the process was killed for its timeout."""
    log: bytes
    dropped: int = 0
    elapsed: float


RunAs = tuple[int, int]
"""(uid, gid) user code runs as."""


def _bind_pfs(source: bytes, run_as: RunAs | None = None) -> Callable[[], None]:
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
        if run_as is not None:
            os.chdir("/pfs")  # the worker's own directory may be closed to that user
            _become(run_as)

    return enter


def _become(run_as: RunAs) -> None:
    # Last, after the mounts, which need root: the groups, then the group, then the user.
    uid, gid = run_as
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def user_code_identity(user: str) -> RunAs | None:
    """The (uid, gid) `user_code_user` names, or None to run user code as ourselves: when it is
    empty, or when we are not root (we could not switch, and are no one special anyway)."""
    if not user or os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        if user.isdigit():
            return int(user), int(user)  # a uid without a passwd entry, as in many images
        raise ValueError(
            f"user_code_user: there is no user {user!r} on this machine; name an existing user"
            " or a numeric uid (DATUMFLOW_USER_CODE_USER)"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _die_with_parent(libc: ctypes.CDLL) -> None:
    # A worker killed with SIGKILL must not leave its user code running on a datum that another
    # worker is about to redo.
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _orphan_guard(run_as: RunAs | None = None) -> Callable[[], None]:
    def enter() -> None:
        _die_with_parent(ctypes.CDLL(None, use_errno=True))
        if run_as is not None:
            _become(run_as)

    return enter


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
    run_as: RunAs | None = None,
    kill: asyncio.Event | None = None,
    keep_log: bool = True,
    spawner: Spawner | None = None,
) -> Outcome:
    """Run `cmd` with the datum's layout, as `run_as` if given (the layout's `out` must be
    theirs); kill it and all its children at `timeout`, or once `kill` is set (the Outcome's
    returncode is None either way). Without `keep_log` every chunk of output goes to
    `on_output` alone, uncapped: a process that outlives one datum has no log of its own."""
    cwd = "/pfs" if mode in ("namespace", "direct") else str(layout)
    started = time.monotonic()
    try:
        if spawner is not None:
            proc: Running | _Slow = await spawner.start(
                cmd, env=env, cwd=cwd, layout=layout, run_as=run_as, stdin=stdin
            )
        else:
            proc = await _Slow.start(cmd, env=env, cwd=cwd, layout=layout, mode=mode, run_as=run_as)
    except (OSError, subprocess.SubprocessError) as exc:
        message = f"could not start {cmd[0]!r}: {exc}\n".encode()
        return Outcome(returncode=127, log=message, elapsed=time.monotonic() - started)
    try:
        return await _watch(proc, stdin, timeout, on_output, kill, keep_log, started)
    finally:
        proc.release()


async def _watch(
    proc: Running | _Slow,
    stdin: bytes,
    timeout: float | None,
    on_output: Callable[[bytes], Awaitable[None]] | None,
    kill: asyncio.Event | None,
    keep_log: bool,
    started: float,
) -> Outcome:
    output_pipe = _pipe_inode(proc.output)
    log = bytearray()
    dropped = 0

    async def pump() -> None:
        nonlocal dropped
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            if not keep_log:
                if on_output is not None:
                    await on_output(chunk)
                continue
            if on_output is not None and len(log) < LOG_CAP:
                await on_output(chunk[: LOG_CAP - len(log)])
            room = LOG_CAP - len(log)
            log.extend(chunk[: max(room, 0)])
            dropped += max(len(chunk) - max(room, 0), 0)

    async def feed() -> None:
        if proc.stdin is None:
            return
        try:
            proc.stdin.write(stdin)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the program did not read its stdin: its choice
        finally:
            proc.stdin.close()

    # No task for a stdin there is not: this runs for every datum.
    readers: asyncio.Future[Any] = (
        asyncio.ensure_future(pump()) if proc.stdin is None else asyncio.gather(pump(), feed())
    )
    try:
        # The exit itself, not proc.wait(): that one also waits for the output pipe to close,
        # which a child left holding it would put off forever, past any datum_timeout.
        if kill is None:
            # The exit future itself, with no task around it: this runs for every datum.
            await asyncio.wait({proc.exited}, timeout=timeout)
            if not proc.exited.done():
                raise TimeoutError
        else:
            await asyncio.wait_for(_exit_or_kill(proc.exited, kill), timeout=timeout)
        returncode: int | None = proc.returncode
    except TimeoutError:
        returncode = None
    finally:
        # Everything the user code started goes down with it: children that outlive it, or a
        # process still running because we were cancelled or timed out. In a PID namespace,
        # what it left was reparented to the namespace's init, which holds nothing else.
        if proc.reaper is None or proc.returncode is None:
            kill_tree(proc.pid, running=proc.returncode is None)
        await proc.exited
        if proc.reaper is not None:
            kill_leftovers(proc.reaper)
    await _drain(readers, proc.output, output_pipe)
    if dropped:
        log.extend(f"\n[datumflow: {dropped} more bytes of output dropped]\n".encode())
    return Outcome(
        returncode=returncode, log=bytes(log), dropped=dropped, elapsed=time.monotonic() - started
    )


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's own protocol, plus a future for the process's exit alone."""

    def __init__(self, *, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


class _Slow:
    """A process started the slow way: forked with a `preexec_fn` that enters a namespace of its
    own, mounts /pfs and switches user (where there is no spawner)."""

    def __init__(
        self, proc: asyncio.subprocess.Process, transport: asyncio.SubprocessTransport
    ) -> None:
        protocol = transport.get_protocol()
        assert isinstance(protocol, _Protocol)
        assert proc.stdout is not None
        self.pid = proc.pid
        self.stdout: asyncio.StreamReader = proc.stdout
        self.stdin: asyncio.StreamWriter | None = proc.stdin
        self.exited = protocol.exited
        self.output = transport.get_pipe_transport(1)
        self.reaper: int | None = None
        self._proc = proc

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def release(self) -> None:
        return None

    @classmethod
    async def start(
        cls,
        cmd: list[str],
        *,
        env: dict[str, str],
        cwd: str,
        layout: Path,
        mode: str,
        run_as: RunAs | None,
    ) -> _Slow:
        preexec = (
            _bind_pfs(str(layout).encode(), run_as)
            if mode == "namespace"
            else _orphan_guard(run_as)
        )
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.subprocess_exec(
            lambda: _Protocol(limit=2**16, loop=loop),
            *cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd if mode != "namespace" else None,
            start_new_session=True,
            preexec_fn=preexec,
        )
        return cls(asyncio.subprocess.Process(transport, protocol, loop), transport)


def _pipe_inode(pipe: asyncio.BaseTransport | None) -> int:
    file = pipe.get_extra_info("pipe") if pipe is not None else None
    try:
        return os.fstat(file.fileno()).st_ino if file is not None else 0
    except OSError:
        return 0


async def _exit_or_kill(exited: asyncio.Future[None], kill: asyncio.Event | None) -> None:
    """Returns when the process exits; raises TimeoutError once `kill` is set before that."""
    if kill is None:
        await asyncio.shield(exited)
        return
    killing: asyncio.Future[None] = asyncio.ensure_future(_set(kill))
    try:
        await asyncio.wait({exited, killing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        killing.cancel()
    if not exited.done():
        raise TimeoutError


async def _set(event: asyncio.Event) -> None:
    """Until `event` is set; a coroutine of None, to be waited on beside the exit future."""
    await event.wait()


async def _drain(
    readers: asyncio.Future[Any], transport: asyncio.BaseTransport | None, inode: int
) -> None:
    """Read the output to its end. A process still holding the output pipe once the tree is
    killed inherited it from the user code and left its session (a daemon that did not close its
    output): it is the user code's too, and is killed. Failing that, we let go of the pipe, so
    that a datum never hangs on it."""
    for wait in (0.5, 2.0):
        if readers.done() or (await asyncio.wait({readers}, timeout=wait))[0]:
            readers.result()  # an error of our own while reading is not to be lost
            return
        for pid in pipe_holders(inode):
            signal_quietly(pid, signal.SIGKILL)
    readers.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await readers
    if transport is not None:
        transport.close()


def user_code_run_as(*, user: str, wanted: str, mode: str) -> RunAs | None:
    """Whom user code runs as: the user `user_code_user` names (as root), else ourselves.

    Never root in that user's place: the layout of pfs_mode env lies under the state directory,
    which that user may not reach, and running the code as root instead would hand it the
    worker's credentials that the setting was there to keep from it. So that case is refused,
    before any datum is taken."""
    run_as = user_code_identity(user)
    if run_as is not None and mode == "env":
        how = "pfs_mode env" + (
            " (auto: this machine gives no mount namespace)" if wanted == "auto" else ""
        )
        raise PermanentError(
            f"user code is to run as {user!r} (DATUMFLOW_USER_CODE_USER), but with {how} it"
            " would have to run as root, which is refused. Give the worker mount namespaces"
            " (root with CAP_SYS_ADMIN, pfs_mode namespace) or /pfs of its own (pfs_mode"
            " direct), or unset DATUMFLOW_USER_CODE_USER to run user code as the worker's user"
        )
    return run_as
