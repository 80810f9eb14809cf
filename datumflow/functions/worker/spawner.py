"""Starting a datum's process without Python code between fork and exec, the fast way.

Python's subprocess forks with vfork (no copy of the worker's memory) only when there is no
`preexec_fn`, `user`, `group` or `extra_groups`; with them it forks the whole interpreter and runs
Python in the child, which costs a datum more than a small command does. So what the child did
before exec is done elsewhere:

- the private /pfs: one mount namespace per worker, made once by a thread of its own
  (`unshare(CLONE_NEWNS)` changes the calling thread alone), with every mount in it made private,
  so nothing in it reaches the machine's. That thread starts every process; a datum's layout is
  bind-mounted at /pfs for as long as its process runs, and unmounted before the next datum's is
  mounted. Datums take turns: a process, and everything it started, is dead before the next one's
  /pfs is mounted (sandbox.run kills the tree first). When the next datum's layout is the very
  directory already at /pfs (commands reuses its layouts, emptied) and nothing can have been
  mounted under it since, the mount is kept: an unmount waits for the kernel's RCU grace period,
  about a millisecond a datum on a busy machine. Nothing can have been: the last process ran as
  a user other than root, or the thread's mount table reads as it did right after the mount
  (any mount, unmount or remount changes it).
  The namespace is a copy of the machine's mounts when the worker started: a file system mounted
  on the machine later is not seen by user code (a datum's own namespace used to copy them anew).
- death with the worker: where the worker may (as root), the spawner's thread also makes a PID
  namespace of its own (functions.worker.pid_namespace), whose first process, its init, reads a
  pipe the worker holds open. When the worker dies, however it dies, the pipe reaches its end,
  the init exits, and the kernel kills every process left in the namespace: all the user code
  the worker started, and everything that started, whatever session it moved to. The init also reaps the orphans user
  code leaves behind; and since datums take turns, whatever is left under the init when a
  datum's process has ended is that datum's, and is killed then (proctree.kill_leftovers).
  User code sees the namespace's pids, as in a container: `$$` is small, and its parent (the
  worker, outside) is not a process it can see or signal.
  Where no PID namespace can be made, `setpriv` (util-linux) sets the parent-death signal
  instead (SIGKILL, once the user is set: a change of user clears it), an exec per datum.
- the user switch: `setpriv` again, exec'd first; it clears the supplementary groups, sets the
  group and the user, then execs the command. Without a user to switch to, and with a PID
  namespace, the command is exec'd directly: `setpriv` costs as much as a small command.
- a session of its own: `start_new_session`, on the fast path too.

Without `setpriv`, or without a namespace for the thread, `Spawner.create` returns None and the
sandbox keeps its `preexec_fn` path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from datumflow.functions.worker.pid_namespace import PidNamespace
from datumflow.functions.worker.proctree import kill_leftovers, kill_tree

_CLONE_NEWNS = 0x00020000
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_MNT_DETACH = 2

RunAs = tuple[int, int]


class Running:
    """A process started by the spawner: its pid, exit, output and input, for sandbox.run."""

    def __init__(
        self,
        *,
        proc: subprocess.Popen[bytes],
        stdout: asyncio.StreamReader,
        output: asyncio.ReadTransport,
        stdin: asyncio.StreamWriter | None,
        exited: asyncio.Future[None],
        release: Callable[[], None],
        reaper: int | None,
    ) -> None:
        self.pid = proc.pid
        self.proc = proc
        self.stdout = stdout
        self.output = output
        """The transport of the output pipe: closed by sandbox._drain when it must let go."""
        self.stdin = stdin
        self.exited = exited
        self.reaper = reaper
        """The pid of the init of the PID namespace the process runs in, if it runs in one: what
        the process leaves behind becomes the init's (proctree.kill_leftovers)."""
        self._release: Callable[[], None] | None = release

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def release(self) -> None:
        """The process is dead and its tree killed: the next datum may have /pfs."""
        release = self._release
        if release is not None:
            self._release = None
            release()


class Spawner:
    """Starts the processes of one worker, one datum at a time, from one thread."""

    def __init__(self, *, setpriv: str, namespace: bool) -> None:
        self.setpriv = setpriv
        self.namespace = namespace
        self.pids: PidNamespace | None = None
        """The PID namespace the processes live in, which dies with the worker (made by
        `_enter`, where it can be): then they need no `setpriv` for a parent-death signal."""
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="datumflow-spawner"
        )
        self._turn = asyncio.Lock()
        self._mounted: tuple[int, int] | None = None
        """The (device, inode) of the layout directory still at /pfs, if any (the thread's own to
        read and set): unmounted just before another one is mounted, or when the spawner closes."""
        self._mounts = b""
        """The thread's mount table right after the last mount at /pfs."""
        self._kept = False
        """Whether the mount may serve the next datum whose layout is that same directory: the
        last process ran as a user other than root, who cannot have mounted anything under it."""

    @classmethod
    def create(cls, *, mode: str, pid_namespace: bool = True) -> Spawner | None:
        """A spawner for the pfs `mode`, or None where this machine gives no fast path.
        `pid_namespace`: make one where possible (False: `setpriv` sets a parent-death signal
        on every process instead, as where none can be made)."""
        setpriv = shutil.which("setpriv")
        if setpriv is None or not hasattr(os, "pidfd_open"):
            return None
        spawner = cls(setpriv=setpriv, namespace=mode == "namespace")
        try:
            spawner._thread.submit(spawner._enter, pid_namespace).result()
        except OSError:
            spawner.close()
            return None
        return spawner

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            self._thread.submit(self._unmount).result()
        self._thread.shutdown(wait=True)
        if self.pids is not None:
            self.pids.close()

    async def start(
        self,
        cmd: list[str],
        *,
        env: dict[str, str],
        cwd: str,
        layout: Path,
        run_as: RunAs | None,
        stdin: bytes,
    ) -> Running:
        """Start `cmd` as `run_as` (or as ourselves), with `layout` at /pfs in the namespace.
        The caller must call `Running.release()` once the process and its tree are dead; until
        then no other process starts."""
        loop = asyncio.get_running_loop()
        await self._turn.acquire()
        if run_as is None and self.pids is not None:
            argv = cmd
        elif self.pids is not None:
            argv = [self.setpriv, *_identity(run_as), "--", *cmd]
        else:
            argv = [self.setpriv, *_identity(run_as), "--pdeathsig", "KILL", "--", *cmd]
        keep = run_as is not None and run_as[0] != 0
        started = self._thread.submit(
            self._popen, argv, env=env, cwd=cwd, layout=layout, stdin=stdin, keep=keep
        )
        try:
            proc = await asyncio.shield(asyncio.wrap_future(started))
        except BaseException:
            # Cancelled while the thread starts it: the process may start all the same, and is
            # then killed, with all it started, before the next one may have /pfs.
            started.add_done_callback(
                lambda _: self._thread.submit(_abandon, started, self._reaper())
            )
            self._thread.submit(self._turn_over, loop)
            raise
        try:
            return await _attach(
                loop, proc, stdin=stdin, release=self._turn.release, reaper=self._reaper()
            )
        except BaseException:
            self._thread.submit(_abandon, started, self._reaper())
            self._thread.submit(self._turn_over, loop)
            raise

    def _reaper(self) -> int | None:
        """The pid of the init of the PID namespace processes start in, if they start in one."""
        return self.pids.reaper if self.pids is not None else None

    def _turn_over(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the thread, after what was submitted before: the next process may start."""
        loop.call_soon_threadsafe(self._turn.release)

    # -- in the spawner's thread ------------------------------------------------------------

    def _enter(self, pid_namespace: bool) -> None:
        """Once, first: the thread's namespaces, and a check that it can mount at /pfs."""
        libc = _libc()
        if self.namespace:
            # The thread alone: unshare changes the calling thread's namespaces.
            if libc.unshare(_CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) in the spawner's thread")
            if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
                raise OSError(ctypes.get_errno(), "making / private in the spawner's namespace")
            _mount(b"/tmp")
            self._mounted = (0, 0)
            self._unmount()
        if pid_namespace and os.geteuid() == 0:
            self.pids = PidNamespace.make()

    def _unchanged(self) -> bool:
        """Whether nothing was mounted, unmounted or remounted since the last mount at /pfs."""
        return _mount_table() == self._mounts

    def _unmount(self) -> None:
        if self._mounted is not None:
            if _libc().umount2(b"/pfs", _MNT_DETACH) != 0:
                raise OSError(ctypes.get_errno(), "unmounting the last datum's /pfs")
            self._mounted = None

    def _popen(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        cwd: str,
        layout: Path,
        stdin: bytes,
        keep: bool,
    ) -> subprocess.Popen[bytes]:
        """The datum's layout at /pfs, then its process, on subprocess's vfork path; `keep`:
        the process runs as a user other than root (see `_kept`)."""
        if self.pids is not None and self.pids.ended:
            self.pids.close()
            self.pids = PidNamespace.make()
            if self.pids is None:
                raise OSError("the worker's PID namespace ended and no new one could be made")
        if self.namespace:
            found = os.stat(layout)
            directory = (found.st_dev, found.st_ino)
            if self._mounted != directory or not (self._kept or self._unchanged()):
                self._unmount()
                _mount(str(layout).encode())
                self._mounted = directory
                self._mounts = _mount_table()
            self._kept = keep
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def _abandon(
    started: concurrent.futures.Future[subprocess.Popen[bytes]], reaper: int | None
) -> None:
    """A process its caller gave up on: killed with everything it started, and reaped."""
    if started.cancelled() or started.exception() is not None:
        return
    proc = started.result()
    kill_tree(proc.pid, running=proc.returncode is None)
    with contextlib.suppress(ChildProcessError):
        proc.wait()
    if reaper is not None:
        kill_leftovers(reaper)


def _identity(run_as: RunAs | None) -> list[str]:
    if run_as is None:
        return []
    uid, gid = run_as
    return [f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


_LIBC: list[ctypes.CDLL] = []


def _libc() -> ctypes.CDLL:
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def _mount_table() -> bytes:
    """The calling thread's mounts: every mount's id, place, options and propagation."""
    with open("/proc/thread-self/mountinfo", "rb") as f:
        return f.read()


def _mount(source: bytes) -> None:
    if _libc().mount(source, b"/pfs", None, _MS_BIND | _MS_REC, None) != 0:
        raise OSError(ctypes.get_errno(), "bind-mounting the datum at /pfs")


async def _attach(
    loop: asyncio.AbstractEventLoop,
    proc: subprocess.Popen[bytes],
    *,
    stdin: bytes,
    release: Callable[[], None],
    reaper: int | None,
) -> Running:
    """The process's pipes and exit on this event loop: its exit seen through a pidfd."""
    exited: asyncio.Future[None] = loop.create_future()
    pidfd = os.pidfd_open(proc.pid)

    def reap() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped by someone else: its code is lost
            proc.returncode = 255
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, reap)
    assert proc.stdout is not None
    reader = asyncio.StreamReader(limit=2**16, loop=loop)
    output, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), proc.stdout
    )
    writer = None
    if proc.stdin is not None:
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.streams.FlowControlMixin(loop=loop), proc.stdin
        )
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return Running(
        proc=proc,
        stdout=reader,
        output=output,
        stdin=writer,
        exited=exited,
        release=release,
        reaper=reaper,
    )
