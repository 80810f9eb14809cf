"""Manifests: a commit's file list, stored as an object of JSON lines sorted by path.

One line per file keeps huge commits streamable: the planner walks a million-file manifest without
holding it, and merges read two sorted streams.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import msgspec

from datumflow.broker.messages import FileRef
from datumflow.storage.base import ObjectStore

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
