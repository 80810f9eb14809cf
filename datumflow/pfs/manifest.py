"""Manifests: a commit's file list, stored as an object of JSON lines sorted by path.

One line per file keeps huge commits streamable: the planner walks a million-file manifest without
holding it, and merges read two sorted streams.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import msgspec

from datumflow.broker.messages import FileRef
from datumflow.storage.base import ObjectStore
from datumflow.storage.file import FileStore

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(FileRef)

EMPTY = ""
"""The manifest key of a commit with no files: nothing to store."""


def encode(files: Iterable[FileRef]) -> bytes:
    buf = bytearray()
    for ref in files:
        _encoder.encode_into(ref, buf, len(buf))
        buf += b"\n"
    return bytes(buf)


async def write(store: ObjectStore, files: Iterable[FileRef]) -> str:
    """Store a manifest (files must be sorted by path); returns its key."""
    data = encode(files)
    if not data:
        return EMPTY
    key, _ = await store.put_bytes(data)
    return key


async def stream(store: ObjectStore, key: str) -> AsyncIterator[FileRef]:
    """The manifest's entries in path order, without reading it whole."""
    if key == EMPTY:
        return
    rest = b""
    async for chunk in store.read(key):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            if line:
                yield _decoder.decode(line)
    if rest:
        yield _decoder.decode(rest)


async def read(store: ObjectStore, key: str) -> list[FileRef]:
    if key == EMPTY:
        return []
    data = await store.get_bytes(key)
    return [_decoder.decode(line) for line in data.split(b"\n") if line]


def iter_lines(path: Path) -> Iterator[FileRef]:
    """Entries of a manifest held in a local file, one line at a time."""
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield _decoder.decode(line)


async def local_copy(store: ObjectStore, key: str, *, scratch: Path) -> Path | None:
    """A local file with the manifest (None for the empty manifest), for synchronous streaming."""
    if key == EMPTY:
        return None
    if isinstance(store, FileStore):
        return store.path(key)  # the file store's object is already a local file
    dest = scratch / f"manifest-{key}"
    await store.get_file(key, dest)
    return dest
