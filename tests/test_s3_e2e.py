"""`datumflow up --storage s3://...` end to end on moto's S3 server: every function and worker uses
the bucket, and a producer's commit event that lists objects by S3 reference runs in place."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import nats
import pytest

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.messages import CommitEvent, FileRef, ObjectSource
from datumflow.errors import PermanentError
from datumflow.pfs.repos import Repos
from datumflow.runtime.embedded import read_instance
from datumflow.settings import Settings
from datumflow.storage import FileStore
from tests.helpers import Cluster, create_pipeline, wait_job_done
from tests.s3cluster import copy_pipeline, repo_files
from tests.s3server import make_bucket, sync_client

pytestmark = pytest.mark.asyncio
MiB = 1 << 20


async def test_up_with_s3_storage_runs_everything_on_the_bucket(
    aws_env: None, moto_process: str, tmp_path: Path
) -> None:
    """As a user runs it: `up --detach --storage s3://...` with its own embedded broker, and
    commands that find it from the state directory alone."""
    s3_endpoint = moto_process
    bucket = make_bucket(s3_endpoint)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
    env.update(DATUMFLOW_HOME=str(home), DATUMFLOW_S3_ENDPOINT=s3_endpoint, DATUMFLOW_GRACE="5")
    # No server: this one's broker is `up`'s own, found in <home>/instance.json.
    cluster = Cluster(home=home, env=env)
    cluster.cli("up", "--detach", "--storage", f"s3://{bucket}/df")
    # Only `up` was told the endpoint: the other commands find it in the instance file, and
    # take only the credentials (AWS_*) from their environment.
    del cluster.env["DATUMFLOW_S3_ENDPOINT"]
    try:
        instance = read_instance(home)
        assert instance is not None and instance.storage == f"s3://{bucket}/df"
        assert instance.s3_endpoint == s3_endpoint
        cluster.settings = Settings(
            home=str(home),
            nats_url=instance.nats_url,
            storage=instance.storage,
            s3_endpoint=s3_endpoint,
        )
        await _run_on_s3(cluster, bucket, s3_endpoint, tmp_path)
    finally:
        cluster.cli("down", check=False)


async def _run_on_s3(cluster: Cluster, bucket: str, endpoint: str, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    files = {f"small{i}.txt": f"small file {i}\n".encode() for i in range(3)}
    files["big.bin"] = os.urandom(17 * MiB)  # past the 16 MiB part size: a multipart upload
    for name, data in files.items():
        (inputs / name).write_bytes(data)
    cluster.cli("create", "repo", "data")
    cluster.cli("put", "file", "data@master:/", "-f", str(inputs), "-r")
    create_pipeline(cluster, tmp_path, copy_pipeline("copy", "data"))
    [job] = await wait_job_done(cluster, "copy")
    assert job.state == "success", job.reason
    assert (job.data_total, job.data_processed) == (4, 4)
    assert await repo_files(cluster, "copy") == {f"/{n}": d for n, d in files.items()}

    out = tmp_path / "big.out"
    cluster.cli("get", "file", "copy@master:/big.bin", "-o", str(out))
    assert out.read_bytes() == files["big.bin"]

    # Everything lives in the bucket, under the prefix: inputs, outputs, manifests, logs.
    keys = [
        o["Key"]
        for page in sync_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    ]
    assert keys and all(k.startswith("df/") for k in keys)
    assert not (cluster.home / "objects").exists()

    # A producer wrote files to S3 itself and announces them by reference, with no hash, on top
    # of the branch head (`parent`): the pipeline runs them in place, and only them.
    source_bucket = make_bucket(endpoint, versioned=True)
    client = sync_client(endpoint)
    refs = []
    produced = {"/in place.csv": b"a,b\n1,2\n", "/c+d.txt": b"plus\n"}
    for path, data in produced.items():
        key = f"drop/{path.lstrip('/')}"
        put = client.put_object(Bucket=source_bucket, Key=key, Body=data)
        source = ObjectSource(
            url=f"s3://{source_bucket}/{key}", etag=put["ETag"], version_id=put["VersionId"]
        )
        refs.append(FileRef(path=path, size=len(data), source=source))
    async with cluster.api() as api:
        head = await api.repos.head("data", "master")
        assert head is not None
    event = CommitEvent(repo="data", commit="f" * 32, parent=head.id, files=refs)
    nc = await nats.connect(cluster.settings.nats_url)
    try:
        await nc.jetstream().publish(
            subjects.commit("data"), msgspec.json.encode(event), headers={"Nats-Msg-Id": "f" * 32}
        )
    finally:
        await nc.close()
    jobs = await wait_job_done(cluster, "copy", count=2)
    assert jobs[0].state == "success", jobs[0].reason
    assert (jobs[0].data_total, jobs[0].data_processed, jobs[0].data_skipped) == (6, 2, 4)
    assert await repo_files(cluster, "copy") == {
        **{f"/{n}": d for n, d in files.items()},
        **produced,
    }
    # `get file` reads an in-place file from its bucket, to stdout or to a file.
    assert cluster.cli("get", "file", "data@master:/c+d.txt").stdout == "plus\n"
    cluster.cli("get", "file", "data@master:/in place.csv", "-o", str(tmp_path / "x.csv"))
    assert (tmp_path / "x.csv").read_bytes() == b"a,b\n1,2\n"


async def test_a_file_store_refuses_files_in_place(broker: Broker, tmp_path: Path) -> None:
    repos = Repos(broker=broker, store=FileStore(tmp_path / "objects"))
    await repos.create_repo("local")
    ref = FileRef(path="/x", size=1, source=ObjectSource(url="s3://b/x", etag="e"))
    with pytest.raises(PermanentError, match="cannot read buckets; run it with --storage s3://"):
        await repos.adopt(CommitEvent(repo="local", commit="c1", files=[ref]))
    bad = FileRef(path="/y", size=1, source=ObjectSource(url="s3://b/", etag="e"))
    with pytest.raises(PermanentError, match="give s3://bucket/key of an object"):
        await repos.adopt(CommitEvent(repo="local", commit="c2", files=[bad]))
    with pytest.raises(PermanentError, match="commit id must be"):
        await repos.adopt(CommitEvent(repo="local", commit="a.b", files=[]))
    no_hash = FileRef(path="/z", size=1)
    with pytest.raises(PermanentError, match=r"refers to object \(no hash\)"):
        await repos.adopt(CommitEvent(repo="local", commit="c3", files=[no_hash]))
    assert await repos.head("local", "master") is None
