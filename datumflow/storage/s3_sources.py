"""Objects read in place: files committed by reference to their own bucket, not copied into the store.

Owns the shape of such a reference (`SourceRef`), what the bucket says an object is now
(`SourceInfo`), and reading one back only while it is still the object that was committed (same
ETag, and version when set): a changed or vanished object fails with a message that says so.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import NamedTuple, Protocol

from datumflow.errors import NotFound, PermanentError
from datumflow.storage.s3_config import S3Client, parse_s3_url
from datumflow.storage.s3_transfer import stream_object


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


def source_stream(*, s3: S3Client, source: SourceRef) -> AsyncGenerator[bytes, None]:
    """The bytes of the committed object `source`; PermanentError if it changed or vanished."""
    bucket, s3_key = parse_s3_url(source.url)
    if not s3_key:
        raise PermanentError(f"source {source.url!r} names a bucket but no object key")
    etag = source.etag.strip('"')
    pinned = f" (version {source.version_id})" if source.version_id else ""
    return stream_object(
        s3=s3,
        bucket=bucket,
        s3_key=s3_key,
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


async def head_source(*, s3: S3Client, url: str) -> SourceInfo | None:
    """What an object in any reachable bucket is now (ETag, size, version); None if absent."""
    bucket, s3_key = parse_s3_url(url)
    if not s3_key:
        raise PermanentError(f"{url!r} names a bucket but no object key")
    try:
        with s3.errors(bucket, s3_key):
            head = await s3.api.head_object(Bucket=bucket, Key=s3_key)
    except NotFound:
        return None  # a HEAD answer has no body: a missing bucket looks like a missing key
    return SourceInfo(
        etag=str(head.get("ETag", "")).strip('"'),
        size=int(head.get("ContentLength", 0)),
        version_id=str(head.get("VersionId", "") or ""),
    )


async def check_listing(*, s3: S3Client, bucket: str, prefix: str) -> None:
    """Fail now, with a clear message, if `bucket` is missing, unreachable or cannot be listed.

    A one-key listing rather than HeadBucket: a HEAD response has no body, so it cannot tell
    bad credentials from a missing permission.
    """
    prefix = prefix.strip("/")
    listing_prefix = f"{prefix}/" if prefix else ""
    with s3.errors(bucket):
        await s3.api.list_objects_v2(Bucket=bucket, Prefix=listing_prefix, MaxKeys=1)
