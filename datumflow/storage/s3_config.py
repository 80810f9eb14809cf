"""S3 configuration: where the endpoint, region and credentials come from, and the open client.

Owns the part-size limits S3 imposes, the `s3://bucket/key` URL form, and `connect`, which turns
the store's options and the usual AWS settings into an aiobotocore client (`S3Client`) carrying
the retry and timeout policy that every request through it shares.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import PartialCredentialsError, ProfileNotFound

from datumflow.errors import DatumflowError, PermanentError
from datumflow.storage.s3_errors import translate, translated

if TYPE_CHECKING:
    # The stubs are a test-time dependency only: the type is never needed at run time.
    from types_aiobotocore_s3.client import S3Client as S3Api

MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB
"""S3 refuses to complete a multipart upload whose parts (but the last) are smaller."""
MAX_PARTS = 10_000
DEFAULT_PART_SIZE = 16 * MiB


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`. The key is taken verbatim, not URL-decoded: an S3 key
    may hold `?`, `#`, `%` or spaces, which a URL parser would cut or decode."""
    rest = url.removeprefix("s3://") if url.startswith("s3://") else ""
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise PermanentError(f"{url!r} is not an S3 URL: use s3://bucket/key")
    return bucket, key


class S3Client:
    """An open aiobotocore S3 client and the policy shared by every request made through it."""

    def __init__(
        self,
        *,
        client: S3Api,
        stack: contextlib.AsyncExitStack,
        concurrency: int,
        max_attempts: int,
    ) -> None:
        self.api = client
        self._stack = stack
        self.endpoint: str = client.meta.endpoint_url
        self.concurrency = concurrency
        self.max_attempts = max_attempts

    async def close(self) -> None:
        await self._stack.aclose()

    def translate(
        self, exc: BaseException, bucket: str, key: str = "", *, missing: str = ""
    ) -> DatumflowError:
        return translate(
            exc,
            endpoint=self.endpoint,
            max_attempts=self.max_attempts,
            bucket=bucket,
            key=key,
            missing=missing,
        )

    def errors(
        self, bucket: str, key: str = "", *, missing: str = ""
    ) -> contextlib.AbstractContextManager[None]:
        """Turn botocore and aiohttp exceptions into datumflow errors that say what to do."""
        return translated(
            endpoint=self.endpoint,
            max_attempts=self.max_attempts,
            bucket=bucket,
            key=key,
            missing=missing,
        )


async def connect(
    *,
    url: str,
    endpoint: str,
    region: str,
    profile: str,
    access_key: str,
    secret_key: str,
    session_token: str,
    concurrency: int,
    max_attempts: int,
    connect_timeout: float,
    read_timeout: float,
    addressing_style: str,
) -> S3Client:
    """Open an S3 client for the store at `url`; explicit options override the AWS settings.

    A custom endpoint (MinIO, Ceph, moto) is addressed path-style unless `addressing_style` says
    otherwise.
    """
    # `endpoint` comes from the settings, which also read AWS_ENDPOINT_URL(_S3).
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
    stack = contextlib.AsyncExitStack()
    try:
        session = AioSession(profile=profile or None)
        client = await stack.enter_async_context(
            session.create_client(
                "s3",
                region_name=region or None,
                endpoint_url=endpoint or None,
                config=config,
                # None leaves the credentials to botocore's chain (environment, profile, role).
                aws_access_key_id=access_key or None,
                aws_secret_access_key=secret_key or None,
                aws_session_token=(session_token or None) if access_key else None,
            )
        )
    except (ProfileNotFound, PartialCredentialsError) as exc:
        await stack.aclose()
        raise PermanentError(f"S3 credentials for {url}: {exc}") from exc
    except BaseException:
        await stack.aclose()
        raise
    return S3Client(client=client, stack=stack, concurrency=concurrency, max_attempts=max_attempts)
