"""A worker's PID namespace: the processes its spawner starts live and die in it.

Its first process, the init (`_INIT`), blocks on a pipe whose other end only the worker holds.
When the worker dies, however it dies, the pipe reaches its end, the init exits, and the kernel
kills every process left in the namespace: all the user code the worker started, and everything
that started, whatever session it moved to. The init also reaps the orphans user code leaves.
Made from the spawner's thread (functions.worker.spawner): `unshare(CLONE_NEWPID)` places the
calling thread's next children in the new namespace, and nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys

_CLONE_NEWPID = 0x20000000

_INIT = """
import os, select, signal

# A SIGCHLD writes to this pipe at the moment it comes: none is lost between two waits. The
# reaping comes first: orphans may have died while this interpreter was starting.
wake, woken = os.pipe()
os.set_blocking(woken, False)
signal.set_wakeup_fd(woken)
signal.signal(signal.SIGCHLD, lambda *_: None)
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    ready, _, _ = select.select([0, wake], [], [])
    if wake in ready:
        os.read(wake, 512)
    if 0 in ready and not os.read(0, 512):
        break
"""
"""The init: reaps orphans; exits once its stdin (the worker's end of a pipe) is closed. Run with
`python -I -S`: the standard library alone, in milliseconds."""


class PidNamespace:
    def __init__(self, init: subprocess.Popen[bytes], lifeline: int) -> None:
        self.init = init
        self._lifeline = lifeline
        """The worker's end of the init's pipe: closed by `close`, or by the kernel."""

    @property
    def reaper(self) -> int:
        """The init's pid: what a process leaves behind in the namespace becomes its child."""
        return self.init.pid

    @property
    def ended(self) -> bool:
        """Whether the init has died (killed from outside: nothing inside may), and with it the
        namespace: no process can be started in it any more."""
        return self.init.poll() is not None

    @classmethod
    def make(cls) -> PidNamespace | None:
        """A new namespace for the calling thread's next children, and its init; None where
        none can be made (no CAP_SYS_ADMIN)."""
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/thread-self/ns/pid", "rb") as ours:
            # Back to our own first: a new one can only be made from there (a no-op the first
            # time; after an init's death, the namespace it took with it).
            if libc.setns(ours.fileno(), _CLONE_NEWPID) != 0:
                return None
        if libc.unshare(_CLONE_NEWPID) != 0:
            return None
        read, write = os.pipe()
        try:
            init = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _INIT],
                stdin=read,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                start_new_session=True,
            )
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)
        return cls(init, write)

    def close(self) -> None:
        """The init exits, and every process left in the namespace goes with it."""
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.init.wait(timeout=10)
