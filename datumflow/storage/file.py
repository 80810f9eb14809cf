"""Local-filesystem object store: the embedded default (`file:///path`).

Each object is written to a temporary file, then renamed into place. It is on disk (fsynced)
before its put returns, unless the store was opened with `sync_on_flush` (the worker's): then a
put returns once the object is in place, and `flush` fsyncs every object put since the last
flush, in one go. The worker flushes before it publishes the results that name them, so a datum's
objects are on disk before anything refers to them, and the disk's waits (a journal commit per
fsync, milliseconds each) are off the datum's own path and shared by all the datums reported
together, as a database commits a group of transactions with one log flush.

Small objects (up to INLINE bytes) are copied and read on the calling thread, the event loop's:
a hop to a thread and back costs more than copying a few kilobytes. Bigger ones, and every
fsync, go to a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from datumflow.errors import NotFound
from datumflow.storage.base import CHUNK

INLINE = 64 << 10
"""Bytes up to which an object is copied without leaving the event loop's thread."""


def _hash_copy(src: Path, dst_fd: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            os.write(dst_fd, chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fsync_all(paths: list[str]) -> None:
    for path in dict.fromkeys(paths):  # each once, in the order put
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FileStore:
    """Objects at `<root>/<key[:2]>/<key>`; written to a temporary file, then renamed into place."""

    def __init__(self, root: Path, *, sync_on_flush: bool = False) -> None:
        self.root = root
        self._top = str(root)
        self._tmp = str(root / "tmp")
        self.url = root.as_uri()
        self.sync_on_flush = sync_on_flush
        """Whether puts leave the fsync to `flush` (see the module's docstring)."""
        self._unsynced: list[str] = []
        """Objects put since the last flush, by path, while `sync_on_flush`."""
        root.mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)

    def path(self, key: str) -> Path:
        if len(key) < 3 or not key.isalnum():
            raise NotFound(f"object key {key!r} is not a content hash")
        return self.root / key[:2] / key

    def file(self, key: str) -> str:
        """`path` as a plain string: for a hot path, where pathlib's joins cost more than the
        file's copy."""
        if len(key) < 3 or not key.isalnum():
            raise NotFound(f"object key {key!r} is not a content hash")
        return f"{self._top}/{key[:2]}/{key}"

    def _commit(self, tmp: str, key: str) -> None:
        final = self.file(key)
        try:
            os.replace(tmp, final)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(final), exist_ok=True)  # the key's first of its prefix
            os.replace(tmp, final)
        if self.sync_on_flush:
            self._unsynced.append(final)

    def _put_file(self, path: Path) -> tuple[str, int]:
        fd, tmp = tempfile.mkstemp(dir=self._tmp)
        try:
            key, size = _hash_copy(path, fd)
            if not self.sync_on_flush:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._commit(tmp, key)
        return key, size

    async def put_file(self, path: Path) -> tuple[str, int]:
        if self.sync_on_flush and os.stat(path).st_size <= INLINE:
            return self._put_file(path)
        return await asyncio.to_thread(self._put_file, path)

    def _put_bytes(self, data: bytes) -> tuple[str, int]:
        key = hashlib.sha256(data).hexdigest()
        final = self.file(key)
        if os.path.exists(final):
            if self.sync_on_flush:
                self._unsynced.append(final)  # put by someone who may not have flushed yet
            return key, len(data)
        fd, tmp = tempfile.mkstemp(dir=self._tmp)
        try:
            os.write(fd, data)
            if not self.sync_on_flush:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._commit(tmp, key)
        return key, len(data)

    async def put_bytes(self, data: bytes) -> tuple[str, int]:
        if self.sync_on_flush and len(data) <= INLINE:
            return self._put_bytes(data)
        return await asyncio.to_thread(self._put_bytes, data)

    async def flush(self) -> None:
        """Every object put since the last flush on disk (nothing to do unless
        `sync_on_flush`). Raises OSError if the disk failed one: its readers must not be told."""
        if self._unsynced:
            paths, self._unsynced = self._unsynced, []
            await asyncio.to_thread(_fsync_all, paths)

    async def get_file(self, key: str, dest: Path) -> int:
        source = self.file(key)
        try:
            # Its size says where to copy it and what to return: objects never change.
            size = os.stat(source).st_size
            if size <= INLINE:
                shutil.copyfile(source, dest)
            else:
                await asyncio.to_thread(shutil.copyfile, source, dest)
        except FileNotFoundError:
            raise NotFound(f"object {key} is not in the store at {self.url}") from None
        return size

    async def get_bytes(self, key: str) -> bytes:
        try:
            with open(self.file(key), "rb") as f:  # noqa: ASYNC230 - a local open, microseconds
                if os.fstat(f.fileno()).st_size <= INLINE:
                    return f.read()  # a datum's manifest, typically: on the loop
                return await asyncio.to_thread(f.read)
        except FileNotFoundError:
            raise NotFound(f"object {key} is not in the store at {self.url}") from None

    async def read(self, key: str) -> AsyncIterator[bytes]:
        try:
            f = open(self.path(key), "rb")  # noqa: ASYNC230 - a local open does not block long
        except FileNotFoundError:
            raise NotFound(f"object {key} is not in the store at {self.url}") from None
        with f:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                yield chunk

    async def exists(self, key: str) -> bool:
        return self.path(key).exists()

    async def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    async def close(self) -> None:
        return None
