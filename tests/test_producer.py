"""A producer outside datumflow, not in Python: examples/producer-js (Node.js, nats.js and the AWS
SDK from the npm registry) puts files into an S3 bucket (moto's server) and announces them with a
commit event whose files are referenced in place; a pipeline runs on them. Events with a bad field
end on df.dead.planner with the reason.

The packages are installed with npm at test time, once, into the repo's ignored `.cache/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import pytest

from datumflow.broker import subjects
from datumflow.broker.messages import DeadLetter
from datumflow.spec import load_spec
from tests.helpers import REPO_ROOT, Cluster, eventually, shared_cluster, wait_job_done
from tests.s3cluster import copy_pipeline, repo_files, use_s3
from tests.s3server import DUMMY_KEY, DUMMY_SECRET, make_bucket

EXAMPLE = REPO_ROOT / "examples" / "producer-js"
NODE = shutil.which("node")
NPM = shutil.which("npm")


pytestmark = [
    pytest.mark.skipif(
        NODE is None or NPM is None, reason="node and npm are not installed on this machine"
    ),
    pytest.mark.asyncio,
]

AWS = {
    "AWS_ACCESS_KEY_ID": DUMMY_KEY,
    "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def producer() -> Path:
    """The example with its packages installed: npm runs only when the lock file changed."""
    assert NPM is not None
    cache = REPO_ROOT / ".cache" / "producer-js"
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json", "publish.mjs"):
        shutil.copyfile(EXAMPLE / name, cache / name)
    lock = hashlib.sha256((EXAMPLE / "package-lock.json").read_bytes()).hexdigest()
    stamp = cache / "node_modules" / ".datumflow-lock-sha256"
    if not stamp.exists() or stamp.read_text() != lock:
        result = subprocess.run(
            [NPM, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=cache,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise AssertionError(f"npm install failed:\n{result.stdout}\n{result.stderr}")
        stamp.write_text(lock)
    return cache


@pytest.fixture(scope="module")
def s3_datumflow(
    moto_process: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, str]]:
    """`datumflow up --storage s3://...` on moto, for the module; yields it and the endpoint."""
    storage = f"s3://{make_bucket(moto_process)}/df"
    with shared_cluster(
        tmp_path_factory.mktemp("producer"),
        DATUMFLOW_STORAGE=storage,
        DATUMFLOW_S3_ENDPOINT=moto_process,
        **AWS,
    ) as cluster:
        yield use_s3(cluster, storage=storage, endpoint=moto_process), moto_process


def node(producer: Path, cluster: Cluster, endpoint: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATUMFLOW_", "AWS_"))}
    env.update(AWS, NATS_URL=cluster.settings.nats_url, S3_ENDPOINT=endpoint)
    assert NODE is not None
    result = subprocess.run(
        [NODE, *args], cwd=producer, env=env, capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise AssertionError(f"node {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


async def test_a_node_producer_commits_files_in_place(
    aws_env: None, producer: Path, s3_datumflow: tuple[Cluster, str], tmp_path: Path
) -> None:
    cluster, endpoint = s3_datumflow
    bucket = make_bucket(endpoint, versioned=True)
    async with cluster.api() as api:
        await api.repos.create_repo("camera")
        spec = load_spec(json.dumps(copy_pipeline("copied", "camera")).encode())
        await api.pipelines.create(spec, ack_wait=cluster.settings.ack_wait)
    files = {f"shot{i}.txt": f"frame {i}\n".encode() for i in range(3)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)

    out = node(
        producer,
        cluster,
        endpoint,
        "publish.mjs",
        "--repo",
        "camera",
        "--bucket",
        bucket,
        "--prefix",
        "incoming",
        *(str(tmp_path / name) for name in files),
    )
    published = json.loads(out)
    assert published["stream"] == subjects.COMMITS_STREAM and not published["duplicate"]

    [job] = await wait_job_done(cluster, "copied")
    assert job.state == "success", job.reason
    assert (job.data_total, job.data_processed) == (3, 3)
    assert await repo_files(cluster, "copied") == {f"/{n}": d for n, d in files.items()}
    async with cluster.api() as api:
        commit = await api.repos.inspect_commit("camera", published["commit"])
        assert commit.origin == "external" and commit.files == 3
        assert job.input_commits[0].commit == published["commit"]
        refs = await api.repos.files(commit)
    # Referenced in place, pinned to the uploaded version: nothing was copied into the store.
    assert [(r.path, r.hash, r.source.url if r.source else "") for r in refs] == [
        (f"/{n}", "", f"s3://{bucket}/incoming/{n}") for n in files
    ]
    assert all(r.source and r.source.etag and r.source.version_id for r in refs)

    # --append: one more file on top of the head the producer reads from the branch's record; the
    # pipeline's next job runs that file alone and keeps what the first did.
    (tmp_path / "late.txt").write_bytes(b"late frame\n")
    appended = json.loads(
        node(
            producer,
            cluster,
            endpoint,
            "publish.mjs",
            "--repo",
            "camera",
            "--bucket",
            bucket,
            "--append",
            str(tmp_path / "late.txt"),
        )
    )
    assert appended["parent"] == published["commit"]
    second = (await wait_job_done(cluster, "copied", count=2))[0]
    assert second.state == "success", second.reason
    assert (second.data_total, second.data_processed, second.data_skipped) == (4, 1, 3)
    assert await repo_files(cluster, "copied") == {
        **{f"/{n}": d for n, d in files.items()},
        "/late.txt": b"late frame\n",
    }


# Published with nats.js as it is, no datumflow code in between: what a producer's bug looks like.
RAW = """
import { connect } from "nats";
const [subject, id, payload] = process.argv.slice(1);
const nc = await connect({ servers: process.env.NATS_URL });
await nc.jetstream().publish(subject, new TextEncoder().encode(payload), { msgID: id });
await nc.drain();
"""


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (
            {"v": 1, "repo": "camera", "files": []},
            "commit event: Object missing required field `commit`",
        ),
        (
            {
                "v": 1,
                "repo": "camera",
                "commit": "c-bad-source",
                "files": [{"path": "/x.txt", "size": 1, "source": {"url": "s3://bucket-only/"}}],
            },
            "/x.txt has source 's3://bucket-only/'; give s3://bucket/key of an object",
        ),
        (
            {"v": 1, "repo": "camera", "commit": "c-no-object", "files": [{"path": "/y.txt"}]},
            "/y.txt refers to object (no hash), which is not in the store",
        ),
    ],
    ids=["missing-commit", "source-without-key", "neither-hash-nor-source"],
)
async def test_a_bad_event_lands_on_the_dead_letter_subject_with_the_reason(
    aws_env: None,
    producer: Path,
    s3_datumflow: tuple[Cluster, str],
    event: dict,
    reason: str,
) -> None:
    cluster, endpoint = s3_datumflow
    async with cluster.api() as api:
        if "camera" not in [r.name for r in await api.repos.list_repos()]:
            await api.repos.create_repo("camera")
    msg_id = uuid.uuid4().hex
    script = "--input-type=module"
    node(
        producer,
        cluster,
        endpoint,
        script,
        "-e",
        RAW,
        "--",
        "df.commit.camera",
        msg_id,
        json.dumps(event),
    )

    nc = await nats.connect(cluster.settings.nats_url)
    try:
        sub = await nc.jetstream().pull_subscribe(
            subjects.dead("planner"), stream=subjects.DEAD_STREAM
        )

        async def letter() -> DeadLetter | None:
            try:
                msgs = await sub.fetch(batch=100, timeout=0.5)
            except nats.errors.TimeoutError:
                return None
            found = None
            for m in msgs:
                dead = msgspec.json.decode(m.data, type=DeadLetter)
                if dead.headers.get("Nats-Msg-Id") == msg_id:
                    found = dead
            return found

        dead = await eventually(letter, timeout=30, what=f"a dead letter for {msg_id}")
    finally:
        await nc.close()
    assert dead.subject == "df.commit.camera"
    assert reason in dead.reason, dead.reason
    assert json.loads(dead.data) == event
    async with cluster.api() as api:
        # Nothing was recorded from it.
        assert all(
            c.id not in ("c-bad-source", "c-no-object")
            for c in await api.repos.list_commits("camera")
        )
