"""The ingest function in this process, against a real nats-server and moto's S3 server over HTTP:
batching, in-place references, duplicates, stale events, dead letters, retries and redelivery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote_plus

import pytest
import pytest_asyncio
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from datumflow.broker.connection import Broker
from datumflow.broker.ingest_stream import INGEST_DURABLE, INGEST_STREAM, ensure_ingest_stream
from datumflow.broker.lease import Lease
from datumflow.broker.messages import FileRef, ObjectSource
from datumflow.broker.records import CommitInfo
from datumflow.functions.ingest import Ingest, IngestOptions
from datumflow.functions.ingest_changes import sequencer_key
from datumflow.pfs.bucket_sources import BucketSources, check_subject, parse_bucket_url
from datumflow.pfs.repos import Repos
from datumflow.storage.s3 import S3Store
from tests import s3server
from tests.helpers import dead_letters, eventually
from tests.s3server import (
    FaultProxy,
    aws_notification,
    make_bucket,
    minio_notification,
    put_and_describe,
    s3_record,
    sync_client,
)

pytestmark = pytest.mark.asyncio


class Harness:
    """Ingest running in a task, a repo fed from a bucket prefix, and ways to look at both."""

    def __init__(self, broker: Broker, store: S3Store, bucket: str, endpoint: str) -> None:
        self.broker = broker
        self.store = store
        self.bucket = bucket
        self.client = sync_client(endpoint)
        self.repos = Repos(broker=broker, store=store)
        self.sources = BucketSources(broker=broker)
        self.tasks: list[tuple[asyncio.Task[None], asyncio.Event]] = []

    def start(self, ingest: Ingest | None = None, **options: Any) -> Ingest:
        ingest = ingest or Ingest(
            broker=self.broker,
            store=self.store,
            options=IngestOptions(window=options.pop("window", 0.5), **options),
        )
        stop = asyncio.Event()
        self.tasks.append((asyncio.create_task(ingest.run(stop)), stop))
        return ingest

    async def stop(self) -> None:
        for task, stop in self.tasks:
            stop.set()
            await asyncio.wait_for(task, timeout=10)
        self.tasks.clear()

    async def publish(self, payload: bytes, subject: str = "df.ingest.test") -> None:
        """On core NATS, as MinIO's NATS target does without jetstream."""
        await self.broker.nc.publish(subject, payload)
        await self.broker.nc.flush()

    async def commits(self, repo: str = "raw") -> list[CommitInfo]:
        return await self.repos.list_commits(repo)

    async def files(self, repo: str = "raw") -> dict[str, FileRef]:
        head = await self.repos.head(repo, "master")
        return {f.path: f for f in await self.repos.files(head)}

    async def drained(self) -> bool:
        """Every notification handled and acked (the work queue keeps the unacked ones)."""
        info = await self.broker.js.stream_info(INGEST_STREAM)
        consumer = await self.broker.js.consumer_info(INGEST_STREAM, INGEST_DURABLE)
        return info.state.messages == 0 and consumer.num_ack_pending == 0

    async def settle(self) -> None:
        await eventually(self.drained, timeout=20, what="ingest to ack every notification")


@pytest_asyncio.fixture
async def harness(broker: Broker, aws_env: None, s3_endpoint: str) -> AsyncIterator[Harness]:
    store = await S3Store.open(f"s3://{make_bucket(s3_endpoint)}/df", endpoint=s3_endpoint)
    h = Harness(broker, store, make_bucket(s3_endpoint), s3_endpoint)
    await h.repos.create_repo("raw")
    await h.sources.add(f"s3://{h.bucket}/incoming", repo="raw")
    await ensure_ingest_stream(broker)  # as `create repo --from-bucket` does
    try:
        yield h
    finally:
        await h.stop()
        await store.close()


KEYS = [
    "incoming/plain.txt",
    "incoming/with space.txt",
    "incoming/a+b.txt",
    "incoming/deep/dir/100% sure?.csv",
    "incoming/ünïcødé #1.txt",
]


async def test_burst_is_one_commit_of_objects_referenced_in_place(harness: Harness) -> None:
    records = []
    for index, key in enumerate(KEYS * 6):
        key = key.replace(".", f"-{index}.", 1)
        records.append(put_and_describe(harness.client, harness.bucket, key, f"{index}\n".encode()))
    # Half MinIO's shape (one record a message), half AWS's (several records a message).
    for record in records[:15]:
        await harness.publish(minio_notification(record))
    for start in range(15, 30, 5):
        await harness.publish(aws_notification(*records[start : start + 5]))
    harness.start(window=1.0)
    await harness.settle()

    [commit] = await harness.commits()
    assert commit.origin == "ingest" and commit.files == 30
    files = await harness.files()
    for record in records:
        # The repo path is the key minus the mapped prefix, decoded.
        path = "/" + _unquote(record["s3"]["object"]["key"]).removeprefix("incoming/")
        ref = files[path]
        assert ref.hash == ""
        assert ref.source == ObjectSource(
            url=f"s3://{harness.bucket}/{_unquote(record['s3']['object']['key'])}",
            etag=record["s3"]["object"]["eTag"],
        )
        assert ref.size == record["s3"]["object"]["size"]
    # The bytes are read back in place, through the store's checked reader.
    ref = files["/a+b-2.txt"]
    assert b"".join([c async for c in harness.store.read_source(ref.source)]) == b"2\n"

    # The same events again (MinIO resends, a bridge redelivers): nothing changes.
    for record in records[:15]:
        await harness.publish(minio_notification(record))
    await harness.publish(aws_notification(*records[15:]))
    await harness.settle()
    assert len(await harness.commits()) == 1

    # An overwrite and a removal: one commit with both.
    overwritten = put_and_describe(harness.client, harness.bucket, "incoming/plain-0.txt", b"new\n")
    harness.client.delete_object(Bucket=harness.bucket, Key="incoming/a+b-2.txt")
    removed = s3_record(
        "ObjectRemoved:Delete",
        harness.bucket,
        "incoming/a+b-2.txt",
        sequencer=s3server.next_sequencer(),
    )
    await harness.publish(minio_notification(overwritten))
    await harness.publish(minio_notification(removed))
    await harness.settle()
    commits = await harness.commits()
    assert len(commits) == 2 and commits[0].parent == commits[1].id
    files = await harness.files()
    assert "/a+b-2.txt" not in files and len(files) == 29
    assert files["/plain-0.txt"].source.etag == overwritten["s3"]["object"]["eTag"]

    # Late events older than what was applied (by sequencer) are stale: no change either.
    await harness.publish(minio_notification(records[0]))  # the first version of plain-0
    await harness.publish(minio_notification(records[2]))  # a+b-2, before its removal
    await harness.settle()
    assert len(await harness.commits()) == 2
    assert (await harness.files())["/plain-0.txt"].source.etag == overwritten["s3"]["object"][
        "eTag"
    ]


def _unquote(key: str) -> str:
    return unquote_plus(key)


async def test_bad_notifications_are_dead_lettered_and_lose_nothing_else(
    harness: Harness,
) -> None:
    good = put_and_describe(harness.client, harness.bucket, "incoming/good.txt", b"good\n")
    evil = s3_record("ObjectCreated:Put", harness.bucket, "incoming/x/../y", etag="e", size=1)
    file_a = put_and_describe(harness.client, harness.bucket, "incoming/a", b"a\n")
    under_a = put_and_describe(harness.client, harness.bucket, "incoming/a/b", b"b\n")
    elsewhere = put_and_describe(harness.client, harness.bucket, "unmapped/z.txt", b"z\n")
    harness.start()
    await harness.publish(b"\x00 not json")
    await harness.publish(b'{"EventName": "s3:ObjectCreated:Put", "Key": "b/k"}')
    await harness.publish(aws_notification(good, evil))
    await harness.publish(aws_notification(file_a, under_a, elsewhere))
    await harness.settle()

    letters = await dead_letters(harness.broker.nc.connected_url.geturl(), "ingest", 4)
    reasons = sorted(letter.reason for letter in letters)
    assert any("not JSON" in r for r in reasons), reasons
    assert any("no 'Records' list" in r for r in reasons), reasons
    assert any("incoming/x/../y" in r and "'..'" in r for r in reasons), reasons
    # S3 holds both `a` and `a/b`; a repo cannot: the shallower one wins, the other is refused.
    assert any("incoming/a/b cannot be the file /a/b: /a is a file" in r for r in reasons), reasons
    assert all(letter.function == "ingest" for letter in letters)
    # The good records of those messages were committed; the unmapped object was ignored.
    assert sorted(await harness.files()) == ["/a", "/good.txt"]
    assert len(await harness.commits()) == 1


async def test_a_batch_is_acked_only_once_its_commit_is_made(
    broker: Broker, aws_env: None, s3_endpoint: str, harness: Harness
) -> None:
    proxy = FaultProxy(s3_endpoint)
    await proxy.start()
    # Ingest's store fails every write for a while: the manifest of the commit cannot be stored.
    failing = await S3Store.open(
        harness.store.url, endpoint=proxy.endpoint, max_attempts=1, part_size=5 << 20
    )
    try:
        proxy.fail(3, status=500, code="InternalError", match=lambda r: r.method == "PUT")
        records = [
            put_and_describe(harness.client, harness.bucket, f"incoming/f{i}", b"x")
            for i in range(10)
        ]
        for record in records:
            await harness.publish(minio_notification(record))
        harness.start(
            Ingest(
                broker=broker,
                store=failing,
                options=IngestOptions(window=0.3, max_retry_delay=0.3),
            )
        )

        async def committed() -> bool:
            # Read the stream first: if a message is gone (acked), its commit must exist already.
            stored = (await broker.js.stream_info(INGEST_STREAM)).state.messages
            commits = await harness.commits()
            assert stored == 10 or commits, "a notification was acked before its commit"
            return bool(commits) and stored == 0

        await eventually(committed, timeout=20, interval=0.02, what="the commit after the faults")
        assert proxy.injected == 3
        [commit] = await harness.commits()
        assert commit.files == 10
    finally:
        await harness.stop()
        await failing.close()
        await proxy.stop()


async def test_redelivery_after_a_crash_between_commit_and_ack_changes_nothing(
    broker: Broker, harness: Harness
) -> None:
    class CrashesBeforeAck(Ingest):
        """Commits its first batch, then hands it back as a dead process would."""

        async def handle(self, msgs: list[Msg]) -> None:
            for msg in msgs:
                msg.ack = msg.nak  # type: ignore[method-assign]
            await super().handle(msgs)
            crashed.set()

    crashed = asyncio.Event()
    records = [
        put_and_describe(harness.client, harness.bucket, f"incoming/r{i}", b"r") for i in range(5)
    ]
    for record in records:
        await harness.publish(minio_notification(record))
    harness.start(CrashesBeforeAck(broker=broker, store=harness.store))
    await asyncio.wait_for(crashed.wait(), timeout=20)
    await harness.stop()
    assert len(await harness.commits()) == 1

    # A fresh process (no memory of sequencers) gets the batch again: the head already has it.
    harness.start()
    await harness.settle()
    [commit] = await harness.commits()
    assert commit.files == 5


async def test_mapping_subjects_on_core_nats_and_on_a_stream_of_their_own(
    broker: Broker, harness: Harness
) -> None:
    # An operator's stream for MinIO with jetstream=on: ingest reads it where it is.
    await broker.js.add_stream(StreamConfig(name="MINIO", subjects=["minio.js.>"]))
    other = make_bucket(harness.client.meta.endpoint_url)
    await harness.repos.create_repo("events")
    await harness.sources.add(f"s3://{other}/core", repo="events", subject="minio.core")
    await harness.sources.add(f"s3://{other}/js", repo="events", subject="minio.js.events")
    ingest = harness.start()
    await eventually(lambda: len(ingest.subs) == 2, what="ingest to bind both streams")
    core = put_and_describe(harness.client, other, "core/one.txt", b"1")
    streamed = put_and_describe(harness.client, other, "js/two.txt", b"2")
    await harness.publish(minio_notification(core), subject="minio.core")
    await broker.js.publish("minio.js.events", minio_notification(streamed))

    async def both() -> bool:
        return sorted(await harness.files("events")) == ["/one.txt", "/two.txt"]

    await eventually(both, timeout=20, what="both notifications committed")
    consumer = await broker.js.consumer_info("MINIO", INGEST_DURABLE)
    assert consumer.num_ack_pending == 0 and consumer.num_pending == 0
    info = await broker.js.stream_info(INGEST_STREAM)
    assert "minio.core" in info.config.subjects and "minio.js.events" not in info.config.subjects


async def test_mapping_validation(harness: Harness) -> None:
    assert parse_bucket_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_bucket_url("s3://bucket") == ("bucket", "")
    for bad in ("bucket/x", "s3:///x", "s3://b/a/../c", "https://b/x"):
        with pytest.raises(Exception, match="bucket"):
            parse_bucket_url(bad)
    for subject in ("df.commit.raw", "df.>", ">", "has space", "$JS.API.x"):
        with pytest.raises(Exception, match=r"subject|capture|datumflow"):
            check_subject(subject)
    assert check_subject("df.ingest.raw") == "df.ingest.raw"
    # One prefix feeds one repo; the same mapping again is fine.
    await harness.sources.add(f"s3://{harness.bucket}/incoming", repo="raw")
    await harness.repos.create_repo("other")
    with pytest.raises(Exception, match="already feeds raw@master"):
        await harness.sources.add(f"s3://{harness.bucket}/incoming/", repo="other")
    assert await harness.sources.remove_repo("raw") == 1
    assert await harness.sources.list() == []


async def test_sequencers_compare_as_hex_numbers() -> None:
    assert sequencer_key("FF") > sequencer_key("0A")
    assert sequencer_key("100") > sequencer_key("FF")
    assert sequencer_key("0055AED6DCD90281E5") > sequencer_key("55AED6DCD90281E4")


async def test_clashes_between_files_and_directories() -> None:
    from datumflow.functions.ingest_changes import Batch, drop_conflicts
    from datumflow.pfs.notifications import ObjectChange

    def put(path: str) -> tuple[FileRef, ObjectChange, object]:
        change = ObjectChange(bucket="b", key=path.lstrip("/"), event="put", event_name="x")
        return FileRef(path=path, size=1, source=ObjectSource(url=f"s3://b{path}")), change, path

    head = {p: FileRef(path=p, size=1, hash="h") for p in ("/a", "/d/e")}
    batch = Batch()
    puts = [put(p) for p in ("/a", "/a/b", "/d", "/n", "/n/m", "/x/y")]
    kept = drop_conflicts(puts, head, set(), batch)  # type: ignore[arg-type]
    # /a is a new version of a file the repo has; /a/b and /d clash with the repo; /n/m with /n.
    assert [ref.path for ref, _, _ in kept] == ["/a", "/n", "/x/y"]
    assert batch.reasons("/a/b") == [  # type: ignore[arg-type]
        "s3://b/a/b cannot be the file /a/b: /a is a file in the repo; rename the object"
    ]
    assert "/d is a directory (it holds /d/e)" in batch.reasons("/d")[0]  # type: ignore[arg-type]
    assert "/n is a file" in batch.reasons("/n/m")[0]  # type: ignore[arg-type]
    # A removed file no longer clashes.
    kept = drop_conflicts([put("/a/b")], head, {"/a"}, Batch())  # type: ignore[arg-type]
    assert [ref.path for ref, _, _ in kept] == ["/a/b"]


async def test_a_replica_paused_mid_commit_never_applies_an_older_version_on_top(
    broker: Broker, harness: Harness
) -> None:
    """Ingest checked its lease, then was paused before its commit while the replica that took
    over committed a newer version of the same key: the older version is not applied on top of
    it, and the batch goes back (to the active replica)."""
    lease = Lease(broker, name="ingest")
    assert await lease.acquire()
    url = f"s3://{harness.bucket}/incoming/k"
    newer = FileRef(path="/k", size=5, source=ObjectSource(url=url, etag="newer"))
    took_over = asyncio.Event()

    class PausedMidCommit(Repos):
        async def commit_files(self, *args: Any, **kwargs: Any) -> CommitInfo:
            if not took_over.is_set():
                took_over.set()  # meanwhile, the other replica commits the newer version
                await harness.repos.commit_files("raw", "master", puts=[newer], origin="ingest")
                lease.drop()  # and this one's lease ran out during the pause
            return await super().commit_files(*args, **kwargs)

    handled = 0

    class Counting(Ingest):
        async def handle(self, msgs: list[Msg]) -> None:
            nonlocal handled
            await super().handle(msgs)
            handled += 1

    ingest = Counting(
        broker=broker,
        store=harness.store,
        options=IngestOptions(window=0.3, max_retry_delay=0.3),
        lease=lease,
    )
    ingest.repos = PausedMidCommit(broker=broker, store=harness.store)
    record = put_and_describe(harness.client, harness.bucket, "incoming/k", b"older")
    await harness.publish(minio_notification(record))
    harness.start(ingest)

    async def settled() -> bool:  # handed back and seen again, or (wrongly) committed and acked
        return handled >= 2 or await harness.drained()

    await eventually(settled, timeout=20, what="the batch to be handled")
    assert (await harness.files())["/k"].source == newer.source
    assert not await harness.drained(), "the older version's notification was acked"
