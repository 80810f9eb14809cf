"""S3 object store (`s3://bucket/prefix`) over aiobotocore, for AWS S3 and S3-compatible servers.

Objects live at `<prefix>/<key[:2]>/<key>`, the same layout as the file backend, so a file store
copied into a bucket is a valid S3 store, and the first two hex digits of the hash spread the keys
over S3's prefix partitions.

Everything streams: uploads read the local file in windows (a multipart part is never held in
memory), downloads write chunks to disk as they arrive. Every object read back is checked against its
content hash. Retries: botocore's standard mode retries each request (503 SlowDown, 5xx, connection
errors) with jittered backoff; on top of that a download whose body breaks half-way resumes with a
ranged GET pinned to the same ETag, which botocore cannot do.

The credentials need s3:ListBucket on the bucket as well as Get/Put/DeleteObject on the prefix: without
ListBucket, S3 answers 403 instead of 404 for a missing object, and the upload de-duplication cannot
tell "absent" from "forbidden". Add a lifecycle rule that aborts incomplete multipart uploads after a
day: an upload killed with its process cannot abort itself.
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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlparse

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
)

from datumflow.errors import DatumflowError, NotFound, PermanentError, StorageError
from datumflow.storage.base import CHUNK

MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB
"""S3 refuses to complete a multipart upload whose parts (but the last) are smaller."""
MAX_PARTS = 10_000
DEFAULT_PART_SIZE = 16 * MiB

# Codes S3 (and MinIO, Ceph) use when the signature or the key itself is wrong.
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
    }
)
_THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests"}
)
_TRANSIENT_CODES = frozenset({"RequestTimeout", "InternalError", "ServiceUnavailable"})
# The uploaded bytes did not match the checksum we computed: the local file changed after it was
# hashed, or the data was damaged on the way. Hashing and uploading again fixes both.
_DIGEST_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "NoSuchVersion", "404", "NotFound"})

# A body that breaks after the response started: botocore does not retry these, we resume.
_STREAM_ERRORS = (
    HTTPClientError,
    IncompleteReadError,
    ReadTimeoutError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
)


class SourceRef(Protocol):
    """An object referenced in place: `datumflow.broker.messages.ObjectSource` has this shape.

    Declared here because the storage layer must not import the broker package.
    """

    url: str
    etag: str
    version_id: str


class SourceInfo(NamedTuple):
    """An object's identity as the bucket reports it now."""

    etag: str
    """Without quotes."""
    size: int
    version_id: str


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _backoff(attempt: int, *, base: float = 0.1, cap: float = 5.0) -> float:
    # Full jitter: concurrent workers that failed together do not come back together.
    return random.uniform(0, min(cap, base * 2**attempt))


def _hash_file(path: Path, part_size: int) -> tuple[str, int, list[bytes]]:
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


def _error_code(exc: ClientError) -> tuple[str, int, str]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0), str(error.get("Message", ""))


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`. The key is taken verbatim, not URL-decoded: an S3 key
    may hold `?`, `#`, `%` or spaces, which a URL parser would cut or decode."""
    rest = url.removeprefix("s3://") if url.startswith("s3://") else ""
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise PermanentError(f"{url!r} is not an S3 URL: use s3://bucket/key")
    return bucket, key


class S3Store:
    """Content-addressed objects in an S3 bucket. Create with `await S3Store.open(url)`."""

    def __init__(
        self,
        *,
        client: Any,
        stack: contextlib.AsyncExitStack,
        url: str,
        bucket: str,
        prefix: str,
        part_size: int,
        multipart_threshold: int,
        concurrency: int,
        max_attempts: int,
    ) -> None:
        self._client = client
        self._stack = stack
        self.url = url
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint: str = client.meta.endpoint_url
        self.part_size = part_size
        self.multipart_threshold = multipart_threshold
        self.concurrency = concurrency
        self.max_attempts = max_attempts

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
        endpoint = (
            endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        ) or ""
        style = addressing_style or ("path" if endpoint else "auto")
        config = AioConfig(
            # total_max_attempts counts the first try; botocore's max_attempts would not.
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, 2 * concurrency),
            s3={"addressing_style": style},
            # We send our own SHA-256 with every upload and hash every download against its key;
            # botocore's default CRC32 on top would only cost a second pass and confuse older
            # S3-compatible servers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        if bool(access_key) != bool(secret_key):
            raise ValueError("give both access_key and secret_key, or neither")
        credentials = {}
        if access_key:
            credentials = {
                "aws_access_key_id": access_key,
                "aws_secret_access_key": secret_key,
                "aws_session_token": session_token or None,
            }
        stack = contextlib.AsyncExitStack()
        try:
            session = AioSession(profile=profile or None)
            client = await stack.enter_async_context(
                session.create_client(
                    "s3",
                    region_name=region or None,
                    endpoint_url=endpoint or None,
                    config=config,
                    **credentials,
                )
            )
        except (ProfileNotFound, PartialCredentialsError) as exc:
            await stack.aclose()
            raise PermanentError(f"S3 credentials for {url}: {exc}") from exc
        except BaseException:
            await stack.aclose()
            raise
        store = cls(
            client=client,
            stack=stack,
            url=f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}",
            bucket=bucket,
            prefix=prefix,
            part_size=part_size,
            multipart_threshold=multipart_threshold or part_size,
            concurrency=concurrency,
            max_attempts=max_attempts,
        )
        if check:
            try:
                await store.check()
            except BaseException:
                await store.close()
                raise
        return store

    async def close(self) -> None:
        await self._stack.aclose()

    async def __aenter__(self) -> S3Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def check(self) -> None:
        """Fail now, with a clear message, if the bucket is missing, unreachable or forbidden.

        A one-key listing rather than HeadBucket: a HEAD response has no body, so it cannot tell
        bad credentials from a missing permission.
        """
        listing_prefix = f"{self.prefix}/" if self.prefix else ""
        with self._errors(self.bucket):
            await self._client.list_objects_v2(Bucket=self.bucket, Prefix=listing_prefix, MaxKeys=1)

    # -- keys and errors --------------------------------------------------------------------------

    def object_key(self, key: str) -> str:
        """The S3 key of content hash `key`."""
        if len(key) < 3 or not key.isalnum():
            raise NotFound(f"object key {key!r} is not a content hash")
        name = f"{key[:2]}/{key}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _missing(self, key: str) -> str:
        return f"object {key} is not in the store at {self.url}"

    def _translate(
        self, exc: BaseException, bucket: str, key: str = "", *, missing: str = ""
    ) -> DatumflowError:
        where = f"s3://{bucket}/{key}" if key else f"bucket {bucket!r}"
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError, ProfileNotFound)):
            return PermanentError(
                f"no usable S3 credentials for {where} ({exc}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance/pod role"
            )
        if isinstance(exc, ConnectionError | HTTPClientError | aiohttp.ClientError):
            return StorageError(
                f"cannot reach the S3 endpoint {self.endpoint} for {where} ({exc}): check the "
                "endpoint setting (DATUMFLOW_S3_ENDPOINT or AWS_ENDPOINT_URL), the network, "
                "and that the server is up",
                delay=5.0,
            )
        if isinstance(exc, ClientError):
            code, status, message = _error_code(exc)
            detail = f"{code or status}: {message}" if message else (code or str(status))
            if code == "NoSuchBucket":
                return NotFound(
                    f"bucket {bucket!r} does not exist at {self.endpoint}: create it "
                    f"(e.g. `aws s3 mb s3://{bucket}`) or fix the URL that names it"
                )
            if code in _MISSING_KEY_CODES and key:
                return NotFound(missing or f"{where} does not exist")
            if code in _CREDENTIAL_CODES:
                return PermanentError(
                    f"the S3 endpoint {self.endpoint} rejected the credentials for {where} "
                    f"({detail}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile"
                )
            if code == "AccessDenied" or status == 403:
                return PermanentError(
                    f"access denied to {where} at {self.endpoint} ({detail}): the credentials are "
                    "wrong, or lack s3:ListBucket on the bucket or Get/Put/DeleteObject on the key"
                )
            if code in _THROTTLE_CODES:
                return StorageError(
                    f"the S3 endpoint {self.endpoint} is throttling requests to {where} "
                    f"({detail}) after {self.max_attempts} attempts: try again later",
                    delay=10.0,
                )
            if code in _DIGEST_CODES:
                return StorageError(
                    f"upload to {where} did not match its checksum ({detail}): the file changed "
                    "while it was uploaded, or the data was damaged on the way; upload it again"
                )
            if status >= 500 or code in _TRANSIENT_CODES:
                return StorageError(
                    f"the S3 endpoint {self.endpoint} failed on {where} ({detail}) after "
                    f"{self.max_attempts} attempts: try again later",
                    delay=5.0,
                )
            return PermanentError(f"S3 request on {where} at {self.endpoint} failed ({detail})")
        if isinstance(exc, BotoCoreError):
            return StorageError(f"S3 request on {where} at {self.endpoint} failed: {exc}")
        raise TypeError(f"not an S3 error: {exc!r}")

    @contextlib.contextmanager
    def _errors(self, bucket: str, key: str = "", *, missing: str = "") -> Iterator[None]:
        """Turn botocore and aiohttp exceptions into datumflow errors that say what to do."""
        try:
            yield
        except (ClientError, BotoCoreError, aiohttp.ClientError) as exc:
            raise self._translate(exc, bucket, key, missing=missing) from exc

    # -- writing ----------------------------------------------------------------------------------

    async def _has(self, s3_key: str, size: int) -> bool:
        """Whether the object is already stored; one of another size is a damaged copy to replace."""
        try:
            with self._errors(self.bucket, s3_key):
                head = await self._client.head_object(Bucket=self.bucket, Key=s3_key)
        except NotFound:
            return False
        return head.get("ContentLength") == size

    def _part_size_for(self, size: int) -> int:
        # S3 allows 10,000 parts: grow the parts (in whole MiB) for files beyond that.
        needed = -(-size // MAX_PARTS)
        return max(self.part_size, -(-needed // MiB) * MiB)

    async def put_file(self, path: Path) -> tuple[str, int]:
        """Hash the file, then upload it unless an object with that hash is already stored."""
        size = (await asyncio.to_thread(os.stat, path)).st_size
        part_size = self._part_size_for(size) if size > self.multipart_threshold else 0
        key, size, part_digests = await asyncio.to_thread(_hash_file, path, part_size)
        s3_key = self.object_key(key)
        if await self._has(s3_key, size):
            return key, size
        if part_size and len(part_digests) > 1:
            await self._put_multipart(path, s3_key, size, part_size, part_digests)
        else:
            body = _FileWindow(path, 0, size)
            try:
                with self._errors(self.bucket, s3_key):
                    await self._client.put_object(
                        Bucket=self.bucket,
                        Key=s3_key,
                        Body=body,
                        ContentLength=size,
                        ChecksumSHA256=_b64(bytes.fromhex(key)),
                    )
            finally:
                body.close()
        return key, size

    async def _put_multipart(
        self, path: Path, s3_key: str, size: int, part_size: int, part_digests: list[bytes]
    ) -> None:
        with self._errors(self.bucket, s3_key):
            created = await self._client.create_multipart_upload(
                Bucket=self.bucket, Key=s3_key, ChecksumAlgorithm="SHA256"
            )
        upload_id = created["UploadId"]
        limit = asyncio.Semaphore(self.concurrency)

        async def upload(number: int) -> dict[str, Any]:
            offset = (number - 1) * part_size
            length = min(part_size, size - offset)
            checksum = _b64(part_digests[number - 1])
            async with limit:
                body = _FileWindow(path, offset, length)
                try:
                    with self._errors(self.bucket, s3_key):
                        response = await self._client.upload_part(
                            Bucket=self.bucket,
                            Key=s3_key,
                            UploadId=upload_id,
                            PartNumber=number,
                            Body=body,
                            ContentLength=length,
                            ChecksumSHA256=checksum,
                        )
                finally:
                    body.close()
            return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}

        tasks = [asyncio.create_task(upload(n)) for n in range(1, len(part_digests) + 1)]
        try:
            parts = await asyncio.gather(*tasks)
            with self._errors(self.bucket, s3_key):
                await self._client.complete_multipart_upload(
                    Bucket=self.bucket,
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
                await self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=s3_key, UploadId=upload_id
                )
            raise

    async def put_bytes(self, data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).digest()
        key = digest.hex()
        s3_key = self.object_key(key)
        if await self._has(s3_key, len(data)):
            return key, len(data)
        with self._errors(self.bucket, s3_key):
            await self._client.put_object(
                Bucket=self.bucket, Key=s3_key, Body=data, ChecksumSHA256=_b64(digest)
            )
        return key, len(data)

    # -- reading ----------------------------------------------------------------------------------

    async def _stream(
        self,
        bucket: str,
        s3_key: str,
        *,
        etag: str = "",
        version_id: str = "",
        sha256: str = "",
        missing: str,
        changed: str = "",
    ) -> AsyncIterator[bytes]:
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
                response = await self._client.get_object(**params)
            except ClientError as exc:
                if changed and _error_code(exc)[0] == "PreconditionFailed":
                    raise PermanentError(changed) from exc
                raise self._translate(exc, bucket, s3_key, missing=missing) from exc
            except (BotoCoreError, aiohttp.ClientError) as exc:
                raise self._translate(exc, bucket, s3_key, missing=missing) from exc
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
            except _STREAM_ERRORS as exc:
                failures += 1
                if failures >= self.max_attempts:
                    raise StorageError(
                        f"reading s3://{bucket}/{s3_key} from {self.endpoint} broke off "
                        f"{failures} times, last at byte {offset} ({exc!r}): try again later"
                    ) from exc
                await asyncio.sleep(_backoff(failures))
                continue
            if offset != total:
                # A clean end of body short of Content-Length: read the rest.
                failures += 1
                if failures >= self.max_attempts:
                    raise StorageError(
                        f"s3://{bucket}/{s3_key} at {self.endpoint} kept ending at byte {offset} "
                        f"of {total}: try again later"
                    )
        if digest is not None and digest.hexdigest() != sha256:
            raise PermanentError(
                f"s3://{bucket}/{s3_key} is damaged: its content hashes to {digest.hexdigest()}, "
                "not to its key; delete it so that the next upload of that content replaces it"
            )

    async def _download(self, stream: AsyncIterator[bytes], dest: Path) -> int:
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

    async def get_file(self, key: str, dest: Path) -> int:
        stream = self._stream(
            self.bucket, self.object_key(key), sha256=key, missing=self._missing(key)
        )
        return await self._download(stream, dest)

    async def get_bytes(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.read(key)])

    async def read(self, key: str) -> AsyncIterator[bytes]:
        stream = self._stream(
            self.bucket, self.object_key(key), sha256=key, missing=self._missing(key)
        )
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                yield chunk

    def _source_stream(self, source: SourceRef) -> AsyncIterator[bytes]:
        bucket, s3_key = parse_s3_url(source.url)
        if not s3_key:
            raise PermanentError(f"source {source.url!r} names a bucket but no object key")
        etag = source.etag.strip('"')
        pinned = f" (version {source.version_id})" if source.version_id else ""
        return self._stream(
            bucket,
            s3_key,
            etag=etag,
            version_id=source.version_id,
            missing=(
                f"{source.url}{pinned} vanished since it was committed: it was deleted or "
                "overwritten in its bucket; commit the file again"
            ),
            changed=(
                f"{source.url}{pinned} changed since it was committed: its ETag is no longer "
                f"{etag}; commit the new version to process it"
            ),
        )

    async def get_source(self, source: SourceRef, dest: Path) -> int:
        """Download an object referenced in place (any bucket the credentials reach) to `dest`.

        The object must still be the one that was committed: same ETag (and version, when set).
        """
        return await self._download(self._source_stream(source), dest)

    async def read_source(self, source: SourceRef) -> AsyncIterator[bytes]:
        """Stream an object referenced in place, checked as `get_source` checks it."""
        stream = self._source_stream(source)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                yield chunk

    async def head_source(self, url: str) -> SourceInfo | None:
        """What an object in any reachable bucket is now (ETag, size, version); None if absent."""
        bucket, s3_key = parse_s3_url(url)
        if not s3_key:
            raise PermanentError(f"{url!r} names a bucket but no object key")
        try:
            with self._errors(bucket, s3_key):
                head = await self._client.head_object(Bucket=bucket, Key=s3_key)
        except NotFound:
            return None  # a HEAD answer has no body: a missing bucket looks like a missing key
        return SourceInfo(
            etag=str(head.get("ETag", "")).strip('"'),
            size=int(head.get("ContentLength", 0)),
            version_id=str(head.get("VersionId", "") or ""),
        )

    async def check_source(self, url: str) -> None:
        """Fail with a clear message unless the bucket of `s3://bucket/prefix` can be listed."""
        bucket, prefix = parse_s3_url(url)
        listing_prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        with self._errors(bucket):
            await self._client.list_objects_v2(Bucket=bucket, Prefix=listing_prefix, MaxKeys=1)

    async def exists(self, key: str) -> bool:
        s3_key = self.object_key(key)
        try:
            with self._errors(self.bucket, s3_key):
                await self._client.head_object(Bucket=self.bucket, Key=s3_key)
        except NotFound:
            return False
        return True

    async def delete(self, key: str) -> None:
        s3_key = self.object_key(key)
        with self._errors(self.bucket, s3_key):
            await self._client.delete_object(Bucket=self.bucket, Key=s3_key)
