"""The S3 error table: botocore and aiohttp exceptions turned into datumflow errors that say what to do.

Owns the S3 error codes (by family: credentials, throttling, transient, digest, missing key), which
of them are worth another try and how long to wait, and the exceptions a broken response body
raises half-way (which botocore does not retry; the reader resumes them).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import aiohttp
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

STREAM_ERRORS = (
    HTTPClientError,
    IncompleteReadError,
    ReadTimeoutError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
)
"""A body that breaks after the response started: botocore does not retry these, the reader resumes."""

REQUEST_ERRORS = (ClientError, BotoCoreError, aiohttp.ClientError)
"""Everything a request to S3 can raise that `translate` knows how to explain."""


def error_code(exc: ClientError) -> tuple[str, int, str]:
    """(code, HTTP status, message) of an S3 error response."""
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0), str(error.get("Message", ""))


def translate(
    exc: BaseException,
    *,
    endpoint: str,
    max_attempts: int,
    bucket: str,
    key: str = "",
    missing: str = "",
) -> DatumflowError:
    """The datumflow error for `exc`, raised by a request on `bucket` (and `key`) at `endpoint`.

    `missing` is the message for an absent key; `max_attempts` is how many tries botocore already
    made, which the message reports.
    """
    where = f"s3://{bucket}/{key}" if key else f"bucket {bucket!r}"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, ProfileNotFound)):
        return PermanentError(
            f"no usable S3 credentials for {where} ({exc}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance/pod role"
        )
    if isinstance(exc, ConnectionError | HTTPClientError | aiohttp.ClientError):
        return StorageError(
            f"cannot reach the S3 endpoint {endpoint} for {where} ({exc}): check the "
            "endpoint setting (DATUMFLOW_S3_ENDPOINT or AWS_ENDPOINT_URL), the network, "
            "and that the server is up",
            delay=5.0,
        )
    if isinstance(exc, ClientError):
        code, status, message = error_code(exc)
        detail = f"{code or status}: {message}" if message else (code or str(status))
        if code == "NoSuchBucket":
            return NotFound(
                f"bucket {bucket!r} does not exist at {endpoint}: create it "
                f"(e.g. `aws s3 mb s3://{bucket}`) or fix the URL that names it"
            )
        if code in _MISSING_KEY_CODES and key:
            return NotFound(missing or f"{where} does not exist")
        if code in _CREDENTIAL_CODES:
            return PermanentError(
                f"the S3 endpoint {endpoint} rejected the credentials for {where} "
                f"({detail}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile"
            )
        if code == "AccessDenied" or status == 403:
            return PermanentError(
                f"access denied to {where} at {endpoint} ({detail}): the credentials are "
                "wrong, or lack s3:ListBucket on the bucket or Get/Put/DeleteObject on the key"
            )
        if code in _THROTTLE_CODES:
            return StorageError(
                f"the S3 endpoint {endpoint} is throttling requests to {where} "
                f"({detail}) after {max_attempts} attempts: try again later",
                delay=10.0,
            )
        if code in _DIGEST_CODES:
            return StorageError(
                f"upload to {where} did not match its checksum ({detail}): the file changed "
                "while it was uploaded, or the data was damaged on the way; upload it again"
            )
        if status >= 500 or code in _TRANSIENT_CODES:
            return StorageError(
                f"the S3 endpoint {endpoint} failed on {where} ({detail}) after "
                f"{max_attempts} attempts: try again later",
                delay=5.0,
            )
        return PermanentError(f"S3 request on {where} at {endpoint} failed ({detail})")
    if isinstance(exc, BotoCoreError):
        return StorageError(f"S3 request on {where} at {endpoint} failed: {exc}")
    raise TypeError(f"not an S3 error: {exc!r}")


@contextlib.contextmanager
def translated(
    *, endpoint: str, max_attempts: int, bucket: str, key: str = "", missing: str = ""
) -> Iterator[None]:
    """Raise the `translate`d datumflow error for any S3 request error inside the block."""
    try:
        yield
    except REQUEST_ERRORS as exc:
        raise translate(
            exc,
            endpoint=endpoint,
            max_attempts=max_attempts,
            bucket=bucket,
            key=key,
            missing=missing,
        ) from exc
