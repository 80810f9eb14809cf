"""S3 object store (`s3://bucket/prefix`) over aiobotocore, for AWS S3 and S3-compatible servers.

Owns `S3Store`, the ObjectStore backend: where a content hash lives in the bucket and what each
store operation asks of S3. Configuration and the client are in `s3_config`, the error table in
`s3_errors`, streaming and multipart transfers in `s3_transfer`, objects read in place from other
buckets in `s3_sources`.

Objects live at `<prefix>/<key[:2]>/<key>`, the same layout as the file backend, so a file store
copied into a bucket is a valid S3 store, and the first two hex digits of the hash spread the keys
over S3's prefix partitions. Every object read back is checked against its content hash.

The credentials need s3:ListBucket on the bucket as well as Get/Put/DeleteObject on the prefix: without
ListBucket, S3 answers 403 instead of 404 for a missing object, and the upload de-duplication cannot
tell "absent" from "forbidden". Add a lifecycle rule that aborts incomplete multipart uploads after a
day: an upload killed with its process cannot abort itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

from datumflow.errors import NotFound
from datumflow.storage.s3_config import (
    DEFAULT_PART_SIZE,
    MIN_PART_SIZE,
    S3Client,
    connect,
    parse_s3_url,
)
from datumflow.storage.s3_sources import (
    SourceInfo,
    SourceRef,
    check_listing,
    head_source,
    source_stream,
)
from datumflow.storage.s3_transfer import (
    b64,
    download,
    hash_file,
    part_size_for,
    put_multipart,
    put_object_file,
    stream_object,
)

__all__ = [
    "DEFAULT_PART_SIZE",
    "MIN_PART_SIZE",
    "S3Store",
    "SourceInfo",
    "SourceRef",
    "parse_s3_url",
]


class S3Store:
    """Content-addressed objects in an S3 bucket. Create with `await S3Store.open(url)`."""

    def __init__(
        self,
        *,
        s3: S3Client,
        url: str,
        bucket: str,
        prefix: str,
        part_size: int,
        multipart_threshold: int,
    ) -> None:
        self._s3 = s3
        self.url = url
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = s3.endpoint
        self.part_size = part_size
        self.multipart_threshold = multipart_threshold
        self.concurrency = s3.concurrency
        self.max_attempts = s3.max_attempts

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        endpoint: str = "",
        region: str = "",
        profile: str = "",
        access_key: str = "",
        secret_key: str = "",
        session_token: str = "",
        part_size: int = DEFAULT_PART_SIZE,
        multipart_threshold: int = 0,
        concurrency: int = 4,
        max_attempts: int = 5,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        addressing_style: str = "",
        check: bool = True,
    ) -> S3Store:
        """Connect to the bucket of `s3://bucket/prefix` and, with `check`, make sure it is usable.

        Endpoint, region and credentials come from the usual AWS settings (AWS_* variables, the
        shared config and credentials files, instance roles); the options here override them.
        `multipart_threshold` defaults to `part_size`. A custom endpoint (MinIO, Ceph, moto) is
        addressed path-style unless `addressing_style` says otherwise.
        """
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"storage URL {url!r}: use s3://bucket or s3://bucket/prefix")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size {part_size} is below S3's minimum of {MIN_PART_SIZE}")
        if concurrency < 1 or max_attempts < 1:
            raise ValueError("concurrency and max_attempts must be at least 1")
        bucket = parsed.netloc
        prefix = parsed.path.strip("/")
        s3 = await connect(
            url=url,
            endpoint=endpoint,
            region=region,
            profile=profile,
            access_key=access_key,
            secret_key=secret_key,
            session_token=session_token,
            concurrency=concurrency,
            max_attempts=max_attempts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            addressing_style=addressing_style,
        )
        store = cls(
            s3=s3,
            url=f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}",
            bucket=bucket,
            prefix=prefix,
            part_size=part_size,
            multipart_threshold=multipart_threshold or part_size,
        )
        if check:
            try:
                await store.check()
            except BaseException:
                await store.close()
                raise
        return store

    async def flush(self) -> None:
        return None  # a put is durable once S3 has answered it

    async def close(self) -> None:
        await self._s3.close()

    async def __aenter__(self) -> S3Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def check(self) -> None:
        """Fail now, with a clear message, if the bucket is missing, unreachable or forbidden."""
        await check_listing(s3=self._s3, bucket=self.bucket, prefix=self.prefix)

    # -- keys -------------------------------------------------------------------------------------

    def object_key(self, key: str) -> str:
        """The S3 key of content hash `key`."""
        if len(key) < 3 or not key.isalnum():
            raise NotFound(f"object key {key!r} is not a content hash")
        name = f"{key[:2]}/{key}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _missing(self, key: str) -> str:
        return f"object {key} is not in the store at {self.url}"

    # -- writing ----------------------------------------------------------------------------------

    async def _has(self, s3_key: str, size: int) -> bool:
        """Whether the object is already stored; one of another size is a damaged copy to replace."""
        try:
            with self._s3.errors(self.bucket, s3_key):
                head = await self._s3.api.head_object(Bucket=self.bucket, Key=s3_key)
        except NotFound:
            return False
        return head.get("ContentLength") == size

    async def put_file(self, path: Path) -> tuple[str, int]:
        """Hash the file, then upload it unless an object with that hash is already stored."""
        size = (await asyncio.to_thread(os.stat, path)).st_size
        part_size = (
            part_size_for(size, part_size=self.part_size) if size > self.multipart_threshold else 0
        )
        key, size, part_digests = await asyncio.to_thread(hash_file, path, part_size)
        s3_key = self.object_key(key)
        if await self._has(s3_key, size):
            return key, size
        if part_size and len(part_digests) > 1:
            await put_multipart(
                s3=self._s3,
                bucket=self.bucket,
                s3_key=s3_key,
                path=path,
                size=size,
                part_size=part_size,
                part_digests=part_digests,
            )
        else:
            await put_object_file(
                s3=self._s3,
                bucket=self.bucket,
                s3_key=s3_key,
                path=path,
                size=size,
                sha256=bytes.fromhex(key),
            )
        return key, size

    async def put_bytes(self, data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).digest()
        key = digest.hex()
        s3_key = self.object_key(key)
        if await self._has(s3_key, len(data)):
            return key, len(data)
        with self._s3.errors(self.bucket, s3_key):
            await self._s3.api.put_object(
                Bucket=self.bucket, Key=s3_key, Body=data, ChecksumSHA256=b64(digest)
            )
        return key, len(data)

    # -- reading ----------------------------------------------------------------------------------

    def _stream(self, key: str) -> AsyncGenerator[bytes, None]:
        return stream_object(
            s3=self._s3,
            bucket=self.bucket,
            s3_key=self.object_key(key),
            sha256=key,
            missing=self._missing(key),
        )

    async def get_file(self, key: str, dest: Path) -> int:
        return await download(self._stream(key), dest)

    async def get_bytes(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.read(key)])

    async def read(self, key: str) -> AsyncIterator[bytes]:
        stream = self._stream(key)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                yield chunk

    async def exists(self, key: str) -> bool:
        s3_key = self.object_key(key)
        try:
            with self._s3.errors(self.bucket, s3_key):
                await self._s3.api.head_object(Bucket=self.bucket, Key=s3_key)
        except NotFound:
            return False
        return True

    async def delete(self, key: str) -> None:
        s3_key = self.object_key(key)
        with self._s3.errors(self.bucket, s3_key):
            await self._s3.api.delete_object(Bucket=self.bucket, Key=s3_key)

    # -- objects in other buckets, read in place --------------------------------------------------

    async def get_source(self, source: SourceRef, dest: Path) -> int:
        """Download an object referenced in place (any bucket the credentials reach) to `dest`.

        The object must still be the one that was committed: same ETag (and version, when set).
        """
        return await download(source_stream(s3=self._s3, source=source), dest)

    async def read_source(self, source: SourceRef) -> AsyncIterator[bytes]:
        """Stream an object referenced in place, checked as `get_source` checks it."""
        stream = source_stream(s3=self._s3, source=source)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                yield chunk

    async def head_source(self, url: str) -> SourceInfo | None:
        """What an object in any reachable bucket is now (ETag, size, version); None if absent."""
        return await head_source(s3=self._s3, url=url)

    async def check_source(self, url: str) -> None:
        """Fail with a clear message unless the bucket of `s3://bucket/prefix` can be listed."""
        bucket, prefix = parse_s3_url(url)
        await check_listing(s3=self._s3, bucket=bucket, prefix=prefix)
