"""The ObjectStore protocol: a content-addressed blob store.

Keys are the sha256 hex of the content, so writing the same bytes twice is harmless and a worker that
crashes half-way through an upload leaves nothing wrong behind. Every method streams: no backend ever
holds a whole file in memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeGuard

if TYPE_CHECKING:
    from datumflow.storage.s3_sources import SourceRef

CHUNK = 1 << 20


class ObjectStore(Protocol):
    url: str

    async def put_file(self, path: Path) -> tuple[str, int]:
        """Store the file's bytes; return (sha256 key, size)."""
        ...

    async def put_bytes(self, data: bytes) -> tuple[str, int]:
        """Store small in-memory content (manifests, logs); return (sha256 key, size)."""
        ...

    async def get_file(self, key: str, dest: Path) -> int:
        """Write the object to `dest`; return its size. Raises NotFound."""
        ...

    async def get_bytes(self, key: str) -> bytes:
        """Read a small object whole (manifests, logs). Raises NotFound."""
        ...

    def read(self, key: str) -> AsyncIterator[bytes]:
        """Stream an object's bytes in chunks. Raises NotFound."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def delete(self, key: str) -> None: ...

    async def flush(self) -> None:
        """Every object put so far durable, for a store whose puts may return before (the
        worker's local store: storage.file). Raises if one could not be made so."""
        ...

    async def close(self) -> None: ...


class InPlaceReader(Protocol):
    """What a store that reads objects in place, from their own bucket, adds (S3 does)."""

    async def get_source(self, source: SourceRef, dest: Path) -> int:
        """Download the committed object `source` to `dest`; return its size."""
        ...

    def read_source(self, source: SourceRef) -> AsyncIterator[bytes]:
        """Stream the committed object `source` in chunks."""
        ...


def reads_in_place(store: object) -> TypeGuard[InPlaceReader]:
    """Whether `store` can read objects in place. By attribute, not by class: the wrappers
    (RetryingStore, FaultyStore) pass the backend's extras through."""
    return (
        getattr(store, "get_source", None) is not None
        and getattr(store, "read_source", None) is not None
    )
