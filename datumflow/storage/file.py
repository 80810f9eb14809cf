"""Local-filesystem object store: the embedded default (`file:///path`)."""

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


def _hash_copy(src: Path, dst_fd: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            os.write(dst_fd, chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class FileStore:
    """Objects at `<root>/<key[:2]>/<key>`; written to a temporary file, then renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._top = str(root)
        self.url = root.as_uri()
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
        final = self.path(key)
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp, final)

    def _put_file(self, path: Path) -> tuple[str, int]:
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            key, size = _hash_copy(path, fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._commit(tmp, key)
        return key, size

    async def put_file(self, path: Path) -> tuple[str, int]:
        return await asyncio.to_thread(self._put_file, path)

    def _put_bytes(self, data: bytes) -> tuple[str, int]:
        key = hashlib.sha256(data).hexdigest()
        if self.path(key).exists():
            return key, len(data)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._commit(tmp, key)
        return key, len(data)

    async def put_bytes(self, data: bytes) -> tuple[str, int]:
        return await asyncio.to_thread(self._put_bytes, data)

    def _get_file(self, key: str, dest: Path) -> int:
        try:
            shutil.copyfile(self.path(key), dest)
        except FileNotFoundError:
            raise NotFound(f"object {key} is not in the store at {self.url}") from None
        return dest.stat().st_size

    async def get_file(self, key: str, dest: Path) -> int:
        return await asyncio.to_thread(self._get_file, key, dest)

    async def get_bytes(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self.path(key).read_bytes)
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
