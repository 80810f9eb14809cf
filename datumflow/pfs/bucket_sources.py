"""Buckets that feed repos: the mappings `datumflow create repo NAME --from-bucket s3://b/prefix`
records, kept in a KV bucket of their own and read by the ingest function.

One record per (bucket, prefix): its key is a hash of the two, so a create-only write is what makes
sure no prefix feeds two repos.
"""

from __future__ import annotations

import builtins
import hashlib
import re

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.kv import Records
from datumflow.broker.topology import ensure_mappings_bucket
from datumflow.errors import Conflict, PermanentError
from datumflow.pfs.notifications import BucketMapping
from datumflow.pfs.paths import check_name

MAPPINGS_BUCKET = subjects.MAPPINGS_BUCKET

# Bucket names as S3-compatible servers accept them (AWS is stricter: no upper case, no `_`).
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_TOKEN_RE = re.compile(r"^[^\s.*>]+$")


class BadSource(PermanentError):
    """A `--from-bucket` URL or notification subject datumflow cannot use."""


def parse_bucket_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket` or `s3://bucket/some/prefix`, the prefix without slashes."""
    if not url.startswith("s3://"):
        raise BadSource(f"{url!r} is not a bucket URL: use s3://bucket or s3://bucket/prefix")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not _BUCKET_RE.match(bucket):
        raise BadSource(f"{url!r}: {bucket!r} is not a valid bucket name")
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise BadSource(
            f"{url!r}: the prefix has an empty, '.' or '..' segment; objects under it could not"
            " be repo files"
        )
    return bucket, prefix


def check_subject(subject: str) -> str:
    """A NATS subject notifications may be published on: tokens, `*` for one, `>` last."""
    tokens = subject.split(".")
    if tokens[0] in ("*", ">") or subject.startswith("$"):
        raise BadSource(
            f"{subject!r} would capture other traffic: start it with a literal token (minio.events)"
        )
    if subjects.reserved(subject):
        raise BadSource(
            f"{subject!r}: subjects under df. are datumflow's own; use df.ingest.<name> or a"
            " subject of your own (e.g. minio.events)"
        )
    for index, token in enumerate(tokens):
        if token == "*" or (token == ">" and index == len(tokens) - 1):
            continue
        if not _TOKEN_RE.match(token):
            raise BadSource(
                f"{subject!r} is not a NATS subject: use dot-separated tokens without spaces,"
                " `*` for one token and `>` as the last one (e.g. minio.events)"
            )
    return subject


def mapping_key(bucket: str, prefix: str) -> str:
    return hashlib.sha256(f"{bucket}\0{prefix.strip('/')}".encode()).hexdigest()[:32]


def source_url(mapping: BucketMapping) -> str:
    return f"s3://{mapping.bucket}/{mapping.prefix}" if mapping.prefix else f"s3://{mapping.bucket}"


class BucketSources:
    """The bucket → repo mappings, in KV."""

    def __init__(self, *, broker: Broker) -> None:
        self.broker = broker
        self._records = Records(broker, bucket=MAPPINGS_BUCKET, type=BucketMapping)
        self._ready = False

    async def _ensure(self) -> Records[BucketMapping]:
        if not self._ready:
            await ensure_mappings_bucket(self.broker)
            self._ready = True
        return self._records

    async def add(
        self, url: str, *, repo: str, branch: str = "master", subject: str = ""
    ) -> BucketMapping:
        """Record that objects under `url` are files of repo@branch. Idempotent; Conflict when the
        bucket and prefix already feed another repo or branch."""
        bucket, prefix = parse_bucket_url(url)
        check_name(repo)
        check_name(branch, what="branch")
        if subject:
            check_subject(subject)
        mapping = BucketMapping(
            bucket=bucket, prefix=prefix, repo=repo, branch=branch, subject=subject
        )
        records = await self._ensure()
        key = mapping_key(bucket, prefix)
        if await records.create(key, mapping):
            return mapping
        existing = await records.find(key)
        if existing is None:  # deleted between the two calls: try once more
            if await records.create(key, mapping):
                return mapping
            existing = await records.find(key)
        if existing == mapping:
            return mapping
        where = f"{existing.repo}@{existing.branch}" if existing else "another repo"
        raise Conflict(
            f"{source_url(mapping)} already feeds {where}: a bucket prefix feeds one repo; "
            "use a longer prefix, or delete that repo first"
        )

    async def list(self) -> list[BucketMapping]:
        return await (await self._ensure()).all()

    # `builtins.list`: in this class `list` names the method above.
    async def for_repo(self, repo: str) -> builtins.list[BucketMapping]:
        return [m for m in await self.list() if m.repo == repo]

    async def remove_repo(self, repo: str) -> int:
        """Forget every mapping that feeds `repo`; returns how many there were."""
        records = await self._ensure()
        removed = 0
        for mapping in await self.for_repo(repo):
            await records.delete(mapping_key(mapping.bucket, mapping.prefix))
            removed += 1
        return removed
