"""Killing a process tree: the user process and everything it started, however it tried to leave.

Owns finding a user process's descendants through /proc (its process group, its session, its
parent links, or everything under the init of its PID namespace), stopping them so that none can
fork while they are found, killing them, and finding the processes that still hold a pipe open.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable


def alive(pid: int) -> bool:
    """Whether process `pid` exists (it may be another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pipe_holders(inode: int) -> set[int]:
    """Processes other than this one with the pipe `inode` open."""
    if not inode:
        return set()
    target = f"pipe:[{inode}]"
    holders: set[int] = set()
    me = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return holders
    for name in entries:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{name}/fd/{fd}") == target:
                    holders.add(int(name))
                    break
            except OSError:
                continue
    return holders


def kill_tree(leader: int, *, running: bool) -> None:
    """SIGKILL the user process `leader` and every process it started.

    The user process leads its own session and process group (start_new_session). Its descendants
    are found three ways, since each alone can be escaped: its process group (`killpg`); its session
    (a child that moved to a group of its own with `setpgid`, as shells with job control do); and,
    while the leader is `running` (not yet reaped, so its pid is still its own), its tree of parent
    links (a child that left with `setsid`). They are stopped first, so that none can fork while
    the tree is walked, then killed.
    """
    _signal_group(leader, signal.SIGSTOP)
    _stop_then_kill(lambda: _tree(leader, running=running))
    _signal_group(leader, signal.SIGKILL)


def kill_leftovers(reaper: int) -> None:
    """SIGKILL every process under `reaper`, the init of a PID namespace whose user process has
    ended: whatever it left, daemons that left its session included, was reparented to the init.
    One read of the init's children when nothing was left, as is usual."""
    _stop_then_kill(lambda: _descendants(reaper))


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            # A process's children hang from the thread that started them; the init has one.
            threads = os.listdir(f"/proc/{parent}/task") if parent != pid else [str(pid)]
        except OSError:
            continue  # gone already
        for thread in threads:
            try:
                with open(f"/proc/{parent}/task/{thread}/children", "rb") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            for child in children:
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def _stop_then_kill(find: Callable[[], set[int]]) -> None:
    """Stop what `find` finds until it finds nothing new (none can fork meanwhile), then kill it."""
    stopped: set[int] = set()
    for _ in range(8):
        found = find() - stopped - {os.getpid()}
        if not found:
            break
        for pid in found:
            signal_quietly(pid, signal.SIGSTOP)
        stopped |= found
    for pid in stopped:
        signal_quietly(pid, signal.SIGKILL)


def _tree(leader: int, *, running: bool) -> set[int]:
    """The members of the leader's session, and their descendants by parent link; with the leader
    `running`, the leader and its descendants too."""
    if not running and not _session_members(leader):
        # The common end of a datum: nothing left of it. One getsid a process tells, without
        # reading every process's /proc entry.
        return set()
    children: dict[int, list[int]] = {}
    members: set[int] = set()
    for ppid, pid, session in _processes():
        children.setdefault(ppid, []).append(pid)
        if session == leader:
            members.add(pid)
    found = {leader} if running else set()
    todo = [*found, *members]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found | members


def _session_members(leader: int) -> bool:
    """Whether any live process is in the session `leader` leads (a zombie counts too)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True  # no way to tell cheaply: the full walk decides
    for name in entries:
        if not name.isdigit():
            continue
        try:
            if os.getsid(int(name)) == leader:
                return True
        except ProcessLookupError:
            continue  # gone already
        except OSError:
            return True  # not ours to ask: the full walk decides
    return False


def _processes() -> list[tuple[int, int, int]]:
    """(parent pid, pid, session id) of every live process; [] where there is no /proc."""
    out: list[tuple[int, int, int]] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone already
        # pid (comm) state ppid pgrp session ...: comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 4 or fields[0] in (b"Z", b"X"):
            continue
        out.append((int(fields[1]), int(name), int(fields[3])))
    return out


def signal_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
