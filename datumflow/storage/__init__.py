"""Object stores: `open_store(url)` picks the backend from the URL's scheme."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from datumflow.storage.base import ObjectStore
from datumflow.storage.file import FileStore

__all__ = ["FileStore", "ObjectStore", "open_store"]


async def open_store(url: str, *, endpoint: str = "", region: str = "") -> ObjectStore:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStore(Path(parsed.path))
    if parsed.scheme == "s3":
        from datumflow.storage.s3 import S3Store

        return await S3Store.open(url, endpoint=endpoint, region=region)
    raise ValueError(f"storage URL {url!r}: use file:///path or s3://bucket/prefix")
