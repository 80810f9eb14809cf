"""Bucket notifications end to end: objects written to moto's S3 server, their notifications published
on NATS, the ingest function of a real `datumflow up` on the S3 backend, pipelines run on the files
in place."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import nats
import pytest

from tests.helpers import (
    Cluster,
    create_pipeline,
    dead_letters,
    eventually,
    jobs_of,
    results_of,
    wait_job_done,
)
from tests.s3cluster import copy_pipeline, repo_files, s3_cluster
from tests.s3server import (
    aws_notification,
    make_bucket,
    minio_notification,
    next_sequencer,
    put_and_describe,
    s3_record,
    sync_client,
)

pytestmark = pytest.mark.asyncio


class Bucket:
    """A source bucket, and the notifications of what is written to it, published on NATS."""

    def __init__(self, endpoint: str, nats_url: str) -> None:
        self.name = make_bucket(endpoint)
        self.client = sync_client(endpoint)
        self.nats_url = nats_url

    def put(self, key: str, body: bytes) -> dict:
        return put_and_describe(self.client, self.name, key, body)

    def delete(self, key: str) -> dict:
        self.client.delete_object(Bucket=self.name, Key=key)
        return s3_record("ObjectRemoved:Delete", self.name, key, sequencer=next_sequencer())

    async def notify(self, *payloads: bytes, subject: str = "df.ingest.minio") -> None:
        """On core NATS, as MinIO's notify_nats target does without jetstream."""
        nc = await nats.connect(self.nats_url)
        try:
            for payload in payloads:
                await nc.publish(subject, payload)
            await nc.flush()
        finally:
            await nc.close()


@pytest.fixture
def fed(
    aws_env: None, moto_process: str, make_cluster: Callable[..., Cluster]
) -> tuple[Cluster, Bucket]:
    """`datumflow up` on a bucket, its ingest function gathering notifications for 1 s."""
    storage = f"s3://{make_bucket(moto_process)}/df"
    cluster = s3_cluster(
        make_cluster, storage=storage, endpoint=moto_process, DATUMFLOW_INGEST_WINDOW="1"
    )
    return cluster, Bucket(moto_process, cluster.server.url)


async def commits_of(cluster: Cluster, repo: str) -> list:
    async with cluster.api() as api:
        return await api.repos.list_commits(repo)


async def test_notifications_become_commits_that_pipelines_run_in_place(
    fed: tuple[Cluster, Bucket], tmp_path: Path
) -> None:
    cluster, bucket = fed
    created = cluster.cli("create", "repo", "photos", "--from-bucket", f"s3://{bucket.name}/cam")
    assert "df.ingest." in created.stderr
    missing = cluster.cli(
        "create", "repo", "nope", "--from-bucket", "s3://no-such-feed", check=False
    )
    assert missing.returncode == 1 and "bucket 'no-such-feed' does not exist" in missing.stderr
    [repo] = json.loads(cluster.cli("list", "repo", "--json").stdout)
    assert repo["name"] == "photos" and repo["from_bucket"] == [f"s3://{bucket.name}/cam"]
    create_pipeline(cluster, tmp_path, copy_pipeline("copy", "photos", parallelism=2))

    contents = {
        "cam/plain.txt": b"plain\n",
        "cam/with space.txt": b"with a space\n",
        "cam/a+b.txt": b"with a plus\n",
        "cam/both + and space.txt": b"both\n",
    }
    records = [bucket.put(key, body) for key, body in contents.items()]
    # MinIO's shape for two, AWS S3's (one message, two records) for the other two.
    await bucket.notify(minio_notification(records[0]), minio_notification(records[1]))
    await bucket.notify(aws_notification(records[2], records[3]))
    try:
        [job] = await wait_job_done(cluster, "copy", timeout=45)
    except AssertionError:
        print(cluster.log("ingest"))
        raise
    assert job.state == "success", job.reason
    assert (job.data_total, job.data_processed) == (4, 4)
    expected = {"/" + key.removeprefix("cam/"): body for key, body in contents.items()}
    assert await repo_files(cluster, "copy") == expected
    [commit] = await commits_of(cluster, "photos")
    assert commit.origin == "ingest"
    # `get file` reads a file of an ingested repo from its bucket.
    assert cluster.cli("get", "file", "photos@master:/a+b.txt").stdout == "with a plus\n"

    # The same notifications again, and a malformed one: no new commit, no new job; the malformed
    # one is dead-lettered. The sentinel after them shows they were all handled.
    await bucket.notify(minio_notification(records[0]), aws_notification(records[2], records[3]))
    await bucket.notify(b'{"Records": [{"eventName": "s3:ObjectCreated:Put"}]}')
    [letter] = await dead_letters(cluster.server.url, "ingest", 1)
    assert letter.function == "ingest" and "Records[0] has no 's3'" in letter.reason

    sentinel = bucket.put("cam/sentinel.txt", b"last\n")
    gone = bucket.delete("cam/plain.txt")
    await bucket.notify(minio_notification(sentinel), minio_notification(gone))
    jobs = await wait_job_done(cluster, "copy", count=2, timeout=45)
    assert len(await commits_of(cluster, "photos")) == 2
    assert len(await jobs_of(cluster, "copy")) == 2
    assert jobs[0].state == "success", jobs[0].reason
    # Only the new file ran; the others were skipped; the removed one took its output with it.
    assert (jobs[0].data_total, jobs[0].data_processed, jobs[0].data_skipped) == (4, 1, 3)
    expected.pop("/plain.txt")
    expected["/sentinel.txt"] = b"last\n"
    assert await repo_files(cluster, "copy") == expected

    # Committed, then changed or deleted in the bucket before a pipeline read it: the datum fails
    # and says why; the others succeed.
    await asyncio.to_thread(bucket.client.delete_object, Bucket=bucket.name, Key="cam/a+b.txt")
    bucket.client.put_object(Bucket=bucket.name, Key="cam/with space.txt", Body=b"changed\n")
    create_pipeline(cluster, tmp_path, copy_pipeline("late", "photos"))
    [late] = await wait_job_done(cluster, "late", timeout=45)
    assert late.state == "failure"
    assert (late.data_total, late.data_processed, late.data_failed) == (4, 2, 2)
    errors = {r.files[0].path: r.error for r in await results_of(cluster, "late") if r.error}
    assert "vanished since it was committed" in errors["/a+b.txt"], errors
    assert f"s3://{bucket.name}/cam/a+b.txt" in errors["/a+b.txt"]
    assert "changed since it was committed" in errors["/with space.txt"], errors


async def test_a_burst_of_200_objects_is_a_few_commits_and_200_datums(
    fed: tuple[Cluster, Bucket], tmp_path: Path
) -> None:
    cluster, bucket = fed
    cluster.cli("create", "repo", "burst", "--from-bucket", f"s3://{bucket.name}/in")
    create_pipeline(cluster, tmp_path, copy_pipeline("count", "burst", parallelism=4))
    expected = {}
    payloads = []
    for i in range(200):
        body = f"object {i}\n".encode()
        expected[f"/obj {i:03d}+.txt"] = body
        record = bucket.put(f"in/obj {i:03d}+.txt", body)
        payloads.append(minio_notification(record) if i % 2 else aws_notification(record))
    # Then their 200 notifications, in groups of 20 messages (not one message of 200 records).
    for start in range(0, 200, 20):
        await bucket.notify(*payloads[start : start + 20])

    async def all_in() -> bool:
        commits = await commits_of(cluster, "burst")
        return bool(commits) and commits[0].files == 200

    try:
        await eventually(all_in, timeout=30, what="200 files committed")
    except AssertionError:
        print(cluster.log("ingest"))
        raise
    commits = await commits_of(cluster, "burst")
    assert 1 <= len(commits) <= 4, [c.files for c in commits]
    jobs = await wait_job_done(cluster, "count", count=len(commits), timeout=60)
    assert all(j.state == "success" for j in jobs), [j.reason for j in jobs]
    assert jobs[0].data_total == 200
    # Every object was processed exactly once over the jobs: the later ones skip what ran.
    assert sum(j.data_processed for j in jobs) == 200
    assert await repo_files(cluster, "count") == expected
