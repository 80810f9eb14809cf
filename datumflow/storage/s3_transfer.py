"""S3 transfers that stream: uploads (single or multipart) from disk, and resumable downloads.

An upload reads the local file in windows, so a multipart part is never held in memory; a download
writes chunks to disk as they arrive and is checked against its content hash. botocore retries each
request; on top of that a download whose body breaks half-way resumes with a ranged GET pinned to
the same ETag, which botocore cannot do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import os
import random
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from datumflow.errors import PermanentError, StorageError
from datumflow.storage.base import CHUNK
from datumflow.storage.s3_config import MAX_PARTS, MiB, S3Client
from datumflow.storage.s3_errors import STREAM_ERRORS, error_code

if TYPE_CHECKING:
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _backoff(attempt: int, *, base: float = 0.1, cap: float = 5.0) -> float:
    # Full jitter: concurrent workers that failed together do not come back together.
    return random.uniform(0, min(cap, base * 2**attempt))


def part_size_for(size: int, *, part_size: int) -> int:
    """The part size to upload `size` bytes with: at least `part_size`, and few enough parts."""
    # S3 allows 10,000 parts: grow the parts (in whole MiB) for files beyond that.
    needed = -(-size // MAX_PARTS)
    return max(part_size, -(-needed // MiB) * MiB)


def hash_file(path: Path, part_size: int) -> tuple[str, int, list[bytes]]:
    """One pass over the file: the sha256 of the whole, and of each part when part_size > 0."""
    whole = hashlib.sha256()
    parts: list[bytes] = []
    part = hashlib.sha256()
    in_part = 0
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            whole.update(chunk)
            size += len(chunk)
            if not part_size:
                continue
            view = memoryview(chunk)
            while view:
                take = min(len(view), part_size - in_part)
                part.update(view[:take])
                in_part += take
                view = view[take:]
                if in_part == part_size:
                    parts.append(part.digest())
                    part, in_part = hashlib.sha256(), 0
    if part_size and (in_part or not parts):
        parts.append(part.digest())
    return whole.hexdigest(), size, parts


class _FileWindow(io.RawIOBase):
    """A read-only, seekable view of `length` bytes of a file from `offset`.

    Handed to botocore as a request body, so a part streams from disk (aiohttp reads it in a thread
    pool, botocore seeks it back to retry). It has no `name` and no `fileno` on purpose: aiohttp
    would otherwise send the file name as a Content-Disposition header and botocore would take the
    whole file's size as the body's length.
    """

    def __init__(self, path: Path, offset: int, length: int) -> None:
        super().__init__()
        self._file = open(path, "rb")
        self._offset = offset
        self._length = length
        self._pos = 0
        self._file.seek(offset)

    def __len__(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            pos += self._pos
        elif whence == io.SEEK_END:
            pos += self._length
        self._pos = max(0, min(pos, self._length))
        self._file.seek(self._offset + self._pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._length - self._pos)
        if want <= 0:
            return 0
        got = self._file.readinto(view[:want]) or 0
        self._pos += got
        return got

    def read(self, size: int = -1) -> bytes:
        remaining = self._length - self._pos
        if size is None or size < 0 or size > remaining:
            size = remaining
        data = self._file.read(size)
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._file.close()
        super().close()


def _body(window: _FileWindow) -> IO[bytes]:
    # The S3 stubs type a request body as typing.IO; botocore reads any seekable file-like
    # object, and a RawIOBase is one without being a typing.IO.
    return cast(IO[bytes], window)


async def put_object_file(
    *, s3: S3Client, bucket: str, s3_key: str, path: Path, size: int, sha256: bytes
) -> None:
    """Upload the whole file in one request, streamed from disk, checked by S3 against `sha256`."""
    body = _FileWindow(path, 0, size)
    try:
        with s3.errors(bucket, s3_key):
            await s3.api.put_object(
                Bucket=bucket,
                Key=s3_key,
                Body=_body(body),
                ContentLength=size,
                ChecksumSHA256=b64(sha256),
            )
    finally:
        body.close()


async def put_multipart(
    *,
    s3: S3Client,
    bucket: str,
    s3_key: str,
    path: Path,
    size: int,
    part_size: int,
    part_digests: list[bytes],
) -> None:
    """Upload the file in parts of `part_size`, `s3.concurrency` at a time; abort on any failure."""
    with s3.errors(bucket, s3_key):
        created = await s3.api.create_multipart_upload(
            Bucket=bucket, Key=s3_key, ChecksumAlgorithm="SHA256"
        )
    upload_id = created["UploadId"]
    limit = asyncio.Semaphore(s3.concurrency)

    async def upload(number: int) -> CompletedPartTypeDef:
        offset = (number - 1) * part_size
        length = min(part_size, size - offset)
        checksum = b64(part_digests[number - 1])
        async with limit:
            body = _FileWindow(path, offset, length)
            try:
                with s3.errors(bucket, s3_key):
                    response = await s3.api.upload_part(
                        Bucket=bucket,
                        Key=s3_key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=_body(body),
                        ContentLength=length,
                        ChecksumSHA256=checksum,
                    )
            finally:
                body.close()
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}

    tasks = [asyncio.create_task(upload(n)) for n in range(1, len(part_digests) + 1)]
    try:
        parts = await asyncio.gather(*tasks)
        with s3.errors(bucket, s3_key):
            await s3.api.complete_multipart_upload(
                Bucket=bucket,
                Key=s3_key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Parts of an unfinished upload are stored (and billed) until it is aborted.
        with contextlib.suppress(Exception):
            await s3.api.abort_multipart_upload(Bucket=bucket, Key=s3_key, UploadId=upload_id)
        raise


async def stream_object(
    *,
    s3: S3Client,
    bucket: str,
    s3_key: str,
    etag: str = "",
    version_id: str = "",
    sha256: str = "",
    missing: str,
    changed: str = "",
) -> AsyncGenerator[bytes, None]:
    """Yield the object's bytes; resume where a broken body stopped, from the same version.

    `etag` (and `version_id`) pin the object: if it is not that one any more, raise
    PermanentError(`changed`). With `sha256`, the bytes must hash to it.
    """
    offset = 0
    total = -1
    failures = 0
    digest = hashlib.sha256() if sha256 else None
    pinned = etag.strip('"')
    while offset != total:
        params: dict[str, Any] = {"Bucket": bucket, "Key": s3_key}
        if version_id:
            params["VersionId"] = version_id
        if pinned:
            params["IfMatch"] = f'"{pinned}"'
        if offset:
            params["Range"] = f"bytes={offset}-"
        try:
            response = await s3.api.get_object(**params)
        except ClientError as exc:
            if changed and error_code(exc)[0] == "PreconditionFailed":
                raise PermanentError(changed) from exc
            raise s3.translate(exc, bucket, s3_key, missing=missing) from exc
        except (BotoCoreError, aiohttp.ClientError) as exc:
            raise s3.translate(exc, bucket, s3_key, missing=missing) from exc
        got = str(response.get("ETag", "")).strip('"')
        if pinned and got and got != pinned:
            # A server that ignores If-Match must not hand us another object's bytes.
            response["Body"].close()
            raise PermanentError(changed or f"s3://{bucket}/{s3_key} changed while read")
        # Pin what we are reading, so that a resumed read continues the same object.
        pinned = pinned or got
        if total < 0:
            total = int(response.get("ContentLength", 0))
        body = response["Body"]
        try:
            async with body:
                while chunk := await body.read(CHUNK):
                    offset += len(chunk)
                    if digest is not None:
                        digest.update(chunk)
                    yield chunk
        except STREAM_ERRORS as exc:
            failures += 1
            if failures >= s3.max_attempts:
                raise StorageError(
                    f"reading s3://{bucket}/{s3_key} from {s3.endpoint} broke off "
                    f"{failures} times, last at byte {offset} ({exc!r}): try again later"
                ) from exc
            await asyncio.sleep(_backoff(failures))
            continue
        if offset != total:
            # A clean end of body short of Content-Length: read the rest.
            failures += 1
            if failures >= s3.max_attempts:
                raise StorageError(
                    f"s3://{bucket}/{s3_key} at {s3.endpoint} kept ending at byte {offset} "
                    f"of {total}: try again later"
                )
    if digest is not None and digest.hexdigest() != sha256:
        raise PermanentError(
            f"s3://{bucket}/{s3_key} is damaged: its content hashes to {digest.hexdigest()}, "
            "not to its key; delete it so that the next upload of that content replaces it"
        )


async def download(stream: AsyncGenerator[bytes, None], dest: Path) -> int:
    """Write a stream to `dest` through a temporary file, so `dest` is never half-written."""
    fd, tmp = await asyncio.to_thread(
        tempfile.mkstemp, dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"
    )
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    await asyncio.to_thread(out.write, chunk)
                    size += len(chunk)
        await asyncio.to_thread(os.replace, tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return size
