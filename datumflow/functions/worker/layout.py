"""Where an in-process datum's /pfs is: in memory for small datums, on disk for the rest.

A thread cannot have a mount namespace of its own, so an in-process function is given its layout's
paths (functions.worker.inprocess). Each user-code thread has its own layout directories, reused
from datum to datum: only what changes is created and removed.

Creating and removing files on a disk can cost more than a tiny datum itself (on the bench machine,
ext4 with `discard` in a VM, about 150 us of CPU per file created and as much per directory), so a
datum whose inputs are small (SMALL bytes in all) is laid out on /dev/shm, a memory filesystem,
when there is one. `out` is always on disk (in memory, `out` is a link to it): output can be large,
and running out of memory is not how a datum should find that out.

In a pod (pfs_mode "direct") the layout is /pfs itself, the medium the pod gave it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from datumflow.broker.messages import DatumTask
from datumflow.functions.worker.proctree import alive

SMALL = 1 << 20
"""A datum with at most this many input bytes is laid out in memory."""
MEMORY = Path("/dev/shm")
MIN_FREE = 64 << 20
"""Memory is used only while the memory filesystem has this much room."""
ROOM_CHECK = 1.0
"""Seconds an answer to "has the memory filesystem room?" is trusted."""
COPY_WHOLE = 1 << 20
"""Files up to this size are copied in one read and one write; larger ones in chunks."""


class Layout(msgspec.Struct, frozen=True, kw_only=True):
    root: Path
    """The datum's /pfs: `root / "<input name>" / "<path>"`, and `root / "out"`."""
    out: Path
    """Where `root / "out"` really is (itself, or the disk directory it links to)."""
    link: Path
    """`root / "out"`, what user code is given."""


class Layouts:
    """The layout directories of one worker's user-code threads."""

    def __init__(self, *, scratch: Path, direct: bool, memory: Path | None = MEMORY) -> None:
        self.scratch = scratch
        self.direct = direct
        self.memory: Path | None = None
        self._made: set[Path] = set()
        self._empty_out: set[Path] = set()
        """Layouts whose `out` was seen empty after their last datum, or made anew."""
        self._picked: dict[tuple[int, bool], Layout] = {}
        self._parked = 0
        self._room_seen = (-1.0, False)
        """(when, whether) the memory filesystem last had room."""
        if memory is not None and not direct and _usable(memory):
            _remove_stale(memory)
            # A directory of our own (mode 0700, a name nobody could have prepared for us): the
            # memory filesystem is shared by every user of the machine.
            self.memory = Path(tempfile.mkdtemp(prefix=f"datumflow-{os.getpid()}-", dir=memory))

    def pick(self, lane: int, *, input_bytes: int, local: bool) -> Layout:
        """The layout for a datum run on user-code thread number `lane`."""
        memory = local and input_bytes <= SMALL and self.memory is not None and self._room()
        found = self._picked.get((lane, memory))
        if found is None:
            if self.direct:
                found = Layout(root=Path("/pfs"), out=Path("/pfs/out"), link=Path("/pfs/out"))
            else:
                disk = self.scratch / f"thread-{lane}" / "pfs"
                root = self.memory / f"thread-{lane}" / "pfs" if memory and self.memory else disk
                found = Layout(root=root, out=disk / "out", link=root / "out")
            self._picked[(lane, memory)] = found
        return found

    def _room(self) -> bool:
        # A statvfs per tiny datum is a good part of its cost; a second-old answer will do, as
        # a datum in memory takes at most SMALL bytes and MIN_FREE leaves room for many.
        now = time.monotonic()
        when, room = self._room_seen
        if now - when > ROOM_CHECK:
            assert self.memory is not None
            room = _has_room(self.memory)
            self._room_seen = (now, room)
        return room

    def prepare(
        self, layout: Layout, task: DatumTask, objects: Callable[[str], str | Path] | None
    ) -> int:
        """Empty the layout of the last datum and lay out this one; with `objects` (a local
        store's path for a content hash) copy the inputs in. Returns the bytes copied. Runs on
        the user-code thread."""
        root, out = layout.root, layout.out
        if root not in self._made:
            root.mkdir(parents=True, exist_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            link = root / "out"
            if link != out and not link.is_symlink():
                link.symlink_to(out, target_is_directory=True)
            self._made.add(root)
        # Plain strings and os calls: pathlib's overhead is a good part of a tiny datum's cost.
        top = str(root)
        names = {i.name for i in task.inputs}
        with os.scandir(top) as entries:
            for entry in entries:
                if entry.name == "out":
                    continue
                if entry.name in names and entry.is_dir(follow_symlinks=False):
                    _empty(entry.path)
                    names.discard(entry.name)
                else:
                    _remove(entry)
        if out in self._empty_out:
            self._empty_out.discard(out)  # until the coming datum is seen to leave it empty
        else:
            _empty(str(out))  # the last datum's outputs are stored by now
        for name in names:
            os.mkdir(f"{top}/{name}")
        total = 0
        if objects is None:
            return total
        for inp in task.inputs:
            base = f"{top}/{inp.name}"
            for ref in inp.files:
                relative = ref.path.lstrip("/")
                dest = f"{base}/{relative}"
                if "/" in relative:
                    os.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
                _copy(objects(ref.hash), dest, ref.size)
                total += ref.size
        return total

    def park(self, layout: Layout) -> Path:
        """Move what the datum wrote out of the way, to be uploaded while the next datum runs
        (its `prepare` empties `out`). The caller removes the returned directory."""
        self._parked += 1
        parked = self.scratch / "parked" / str(self._parked)
        parked.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(layout.out, parked)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.move(layout.out, parked)  # /pfs in a pod is its own filesystem
        layout.out.mkdir()
        self._empty_out.add(layout.out)
        return parked

    def emptied(self, layout: Layout) -> None:
        """The datum's call ended with `out` empty: the next `prepare` need not look again."""
        self._empty_out.add(layout.out)

    def close(self) -> None:
        if self.memory is not None:
            shutil.rmtree(self.memory, ignore_errors=True)


def _copy(src: str | Path, dest: str, size: int) -> None:
    """Copy a stored object: in the kernel (sendfile, no bytes through Python), else by reads."""
    if size > COPY_WHOLE:
        shutil.copyfile(src, dest)
        return
    fd = os.open(src, os.O_RDONLY)
    try:
        to = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            if size:
                _send(fd, to, size)
        finally:
            os.close(to)
    finally:
        os.close(fd)


def _send(fd: int, to: int, size: int) -> None:
    sent = 0
    try:
        while sent < size and (n := os.sendfile(to, fd, sent, COPY_WHOLE)):
            sent += n
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS) or sent:
            raise
        while chunk := os.read(fd, COPY_WHOLE):  # a file system without sendfile
            view = memoryview(chunk)
            while view:
                view = view[os.write(to, view) :]


def _empty(path: str) -> None:
    with os.scandir(path) as entries:
        for entry in entries:
            _remove(entry)


def _remove(entry: os.DirEntry[str]) -> None:
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path)
    else:
        os.unlink(entry.path)


def _usable(memory: Path) -> bool:
    return memory.is_dir() and os.access(memory, os.W_OK | os.X_OK) and _has_room(memory)


def _has_room(memory: Path) -> bool:
    try:
        stat = os.statvfs(memory)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize >= MIN_FREE


def _remove_stale(memory: Path) -> None:
    """Layouts left in memory by workers that were killed: nobody else removes them."""
    for path in memory.glob("datumflow-*-*"):
        pid = path.name.split("-")[1]
        if not pid.isdigit() or alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(path)
