"""Repos fed from buckets: `create repo --from-bucket`, and reading files held in place."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import typer

from datumflow.broker.ingest_stream import DEFAULT_SUBJECT, ensure_ingest_stream
from datumflow.broker.messages import FileRef
from datumflow.cli.context import Api, fail
from datumflow.errors import Conflict
from datumflow.pfs.bucket_sources import BucketSources, parse_bucket_url, source_url
from datumflow.pfs.notifications import BucketMapping
from datumflow.storage import ObjectStore
from datumflow.storage.base import InPlaceReader, reads_in_place


async def create_fed_repo(
    api: Api, name: str, description: str, url: str, branch: str, subject: str
) -> None:
    check_source = getattr(api.store, "check_source", None)
    if check_source is None:
        fail(
            f"repo {name} would hold the objects of {url} in place, but this datumflow stores"
            f" its objects at {api.store.url}, so its workers could not read them: run it with"
            " `datumflow up --storage s3://BUCKET/PREFIX` (and DATUMFLOW_S3_ENDPOINT for MinIO)"
        )
    await check_source(url)  # a missing bucket or a refused listing fails here, clearly
    sources = BucketSources(broker=api.broker)
    try:
        await api.repos.create_repo(name, description=description)
    except Conflict:
        bucket, prefix = parse_bucket_url(url)
        already = BucketMapping(
            bucket=bucket, prefix=prefix, repo=name, branch=branch, subject=subject
        )
        if already not in await sources.for_repo(name):
            raise
    mapping = await sources.add(url, repo=name, branch=branch, subject=subject)
    # Capture the subject now, so notifications sent before ingest (re)starts wait for it.
    wanted = {m.subject for m in await sources.list() if m.subject}
    await ensure_ingest_stream(api.broker, wanted)
    typer.echo(
        f"repo {name}@{branch} is fed from {source_url(mapping)}: publish its bucket"
        f" notifications on {mapping.subject or DEFAULT_SUBJECT.replace('>', name)}",
        err=True,
    )


def in_place(store: ObjectStore, ref: FileRef) -> InPlaceReader:
    """The store, if it can read objects in place (S3); otherwise exit with the reason."""
    if not reads_in_place(store):
        assert ref.source is not None
        fail(
            f"{ref.path} is the object {ref.source.url}, read in place, but this datumflow"
            f" stores its objects at {store.url}: use the datumflow that ingested it, or run"
            " with --storage s3://BUCKET/PREFIX"
        )
    return store


async def get_file_to(store: ObjectStore, ref: FileRef, dest: Path) -> int:
    if ref.source is not None:
        return await in_place(store, ref).get_source(ref.source, dest)
    return await store.get_file(ref.hash, dest)


def read_file(store: ObjectStore, ref: FileRef) -> AsyncIterator[bytes]:
    if ref.source is not None:
        return in_place(store, ref).read_source(ref.source)
    return store.read(ref.hash)
