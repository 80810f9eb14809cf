"""Two ingest replicas (`DATUMFLOW_CONTROL_REPLICAS=2`): the active one, holding the ingest lease,
is SIGKILLed; the standby takes over within seconds and commits what arrives after, newest version
of each object last; nothing is lost or dead-lettered."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from datumflow.broker import subjects
from datumflow.broker.topology import LEASE_TTL
from tests.faults.failover import lease_holder
from tests.faults.harness import function_pids, sigkill, stream_count
from tests.helpers import Cluster, eventually
from tests.s3cluster import repo_files, s3_cluster
from tests.s3server import make_bucket, minio_notification
from tests.test_ingest_e2e import Bucket

pytestmark = pytest.mark.asyncio


async def test_active_ingest_killed_the_standby_commits_what_follows(
    aws_env: None, moto_process: str, make_cluster: Callable[..., Cluster]
) -> None:
    storage = f"s3://{make_bucket(moto_process)}/df"
    cluster = s3_cluster(
        make_cluster,
        storage=storage,
        endpoint=moto_process,
        DATUMFLOW_INGEST_WINDOW="0.5",
        DATUMFLOW_CONTROL_REPLICAS="2",
    )
    bucket = Bucket(moto_process, cluster.server.url)
    cluster.cli("create", "repo", "feed", "--from-bucket", f"s3://{bucket.name}/in")
    expected: dict[str, bytes] = {}

    async def burst(first: int, count: int, version: str) -> None:
        payloads = []
        for i in range(first, first + count):
            body = f"object {i} {version}\n".encode()
            expected[f"/o{i:03d}"] = body
            payloads.append(minio_notification(bucket.put(f"in/o{i:03d}", body)))
        await bucket.notify(*payloads)

    async def committed() -> bool:
        try:
            return await repo_files(cluster, "feed") == expected
        except Exception:
            return False

    active = await eventually(
        lambda: lease_holder(cluster, "ingest"),
        until=lambda h: h is not None and h.pid in function_pids(cluster, "ingest"),
        what="an active ingest",
    )
    assert active is not None
    await burst(0, 30, "v1")
    await eventually(committed, timeout=30, what="the first burst committed")
    sigkill(active.pid)
    killed = time.monotonic()
    # While no replica is active: new objects, and new versions of ten of the first ones.
    await burst(30, 30, "v1")
    await burst(0, 10, "v2")
    taken = await eventually(
        lambda: lease_holder(cluster, "ingest"),
        until=lambda h: h is not None and h.pid != active.pid,
        timeout=LEASE_TTL + 10,
        interval=0.05,
        what="the standby ingest to take over",
    )
    gap = time.monotonic() - killed
    assert taken is not None and taken.pid in function_pids(cluster, "ingest")
    await eventually(committed, timeout=30, what="the second burst committed by the standby")
    done = time.monotonic() - killed
    print(f"ingest takeover after SIGKILL: {gap:.2f}s; burst committed {done:.2f}s after")
    assert gap < LEASE_TTL + 3
    assert await stream_count(cluster, subjects.DEAD_STREAM) == 0
