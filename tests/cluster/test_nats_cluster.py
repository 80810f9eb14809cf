"""datumflow on several hosts: three nats-servers clustered with JetStream, each on its own host,
moto's S3 server on a fourth, the control plane (`datumflow up` on the cluster) on a fifth and
more workers on a sixth; every stream, bucket and consumer kept on three servers.

A job of a few hundred datums succeeds with exact figures and the output a fault-free run makes,
while the leader of the datums stream is SIGKILLed mid-job and later restarted to rejoin.
The hosts are network namespaces (tests/hosts.py): this needs root and iproute2.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from datumflow.broker import subjects
from datumflow.cli.context import Api, open_api
from datumflow.settings import Settings
from tests.faults import harness
from tests.helpers import create_pipeline, eventually, put_files
from tests.hosts import Hosts, hosts, unavailable
from tests.natscluster import NatsCluster, Node, stream_info
from tests.s3server import DUMMY_KEY, DUMMY_SECRET, make_bucket

# A job of a few hundred datums through a fault and its recovery: about a minute when the machine
# is quiet, twice that when it is not.
pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]
log = logging.getLogger(__name__)

HOSTS = ["n1", "n2", "n3", "s3", "cp", "w1"]
NATS_HOSTS = HOSTS[:3]

DATUMS = 300
ACK_WAIT = "10"


@pytest.fixture
def lab() -> Iterator[Hosts]:
    why = unavailable()
    if why:
        pytest.skip(f"cannot make hosts as network namespaces here: {why}")
    with hosts(HOSTS) as made:
        yield made
    assert not made.leftovers(), f"left behind: {made.leftovers()}"


class _Servers:
    """What tests.faults.harness reads as `cluster.server.url`: every node, as a list."""

    def __init__(self, nats: NatsCluster) -> None:
        self.url = [node.url for node in nats.nodes]


class Deployment:
    """datumflow across the hosts, seen from the test (which reaches every host over the bridge):
    what tests.faults.harness needs of a cluster."""

    def __init__(self, lab: Hosts, nats: NatsCluster, root: Path, *, storage: str, s3: str):
        self.lab = lab
        self.nats = nats
        self.server = _Servers(nats)
        self.root = root
        self.home = root / "cp"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DATUMFLOW_", "AWS_"))}
        self.env.update(
            DATUMFLOW_NATS_URL=nats.url,
            DATUMFLOW_REPLICAS="3",
            DATUMFLOW_STORAGE=storage,
            DATUMFLOW_S3_ENDPOINT=s3,
            DATUMFLOW_S3_REGION="us-east-1",
            DATUMFLOW_ACK_WAIT=ACK_WAIT,
            DATUMFLOW_GRACE="5",
            AWS_ACCESS_KEY_ID=DUMMY_KEY,
            AWS_SECRET_ACCESS_KEY=DUMMY_SECRET,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_CONFIG_FILE=str(root / "no-aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(root / "no-aws-credentials"),
            AWS_EC2_METADATA_DISABLED="true",
        )
        self.settings = Settings(
            home=str(self.home), nats_url=nats.url, replicas=3, storage=storage, s3_endpoint=s3
        )

    def datumflow(self, host: str, *args: str) -> subprocess.Popen[bytes]:
        """`datumflow --home <root>/<host> ARGS` on `host`."""
        home = self.root / host
        home.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "DATUMFLOW_HOME": str(home)}
        argv = [sys.executable, "-m", "datumflow.cli.main", "--home", str(home), *args]
        return self.lab[host].run(argv, env=env, log=self.root / f"{host}-{args[0]}.log")

    @contextlib.asynccontextmanager
    async def api(self) -> AsyncIterator[Api]:
        async with open_api(self.settings) as api:
            yield api

    def cli(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "DATUMFLOW_HOME": str(self.home)}
        result = subprocess.run(
            [sys.executable, "-m", "datumflow.cli.main", "--home", str(self.home), *args],
            env=env,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"datumflow {' '.join(args)}: {result.stderr}"
        return result

    def log(self, name: str) -> str:
        for path in (self.home / "logs" / f"{name}.log", self.root / f"{name}.log"):
            if path.exists():
                return path.read_text(errors="replace")[-4000:]
        return f"(no log of {name})"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


@pytest_asyncio.fixture
async def deployment(lab: Hosts, tmp_path: Path, aws_env: None) -> AsyncIterator[Deployment]:
    nodes = [
        Node(
            name=name,
            root=tmp_path / "nats",
            host=lab[name].address,
            port=4222,
            cluster_port=6222,
            monitor_port=8222,
            launcher=lab[name].launcher,
        )
        for name in NATS_HOSTS
    ]
    nats = NatsCluster(nodes)
    try:
        nats.start()
        s3 = f"http://{lab['s3'].address}:5000"
        lab["s3"].run(
            [sys.executable, "-m", "moto.server", "-H", lab["s3"].address, "-p", "5000"],
            log=tmp_path / "moto.log",
        )
        await nats.wait_healthy()
        await eventually(
            lambda: asyncio.to_thread(_answers, s3 + "/moto-api/"), what="moto to listen"
        )
        bucket = make_bucket(s3)
        yield Deployment(lab, nats, tmp_path, storage=f"s3://{bucket}/df", s3=s3)
    finally:
        nats.stop()


async def test_a_job_survives_the_sigkill_of_its_stream_leader_then_its_consumer_leader(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    started = time.monotonic()
    d.datumflow("cp", "up")
    await eventually(
        lambda: asyncio.to_thread(lambda: (d.home.parent / "cp" / "instance.json").exists()),
        what="datumflow up on cp",
    )
    marks = tmp_path / "marks"
    marks.mkdir()
    data = harness.make_dataset(DATUMS, seed=11)
    await put_files(d, "data", data.files)  # type: ignore[arg-type]
    spec = harness.pipeline_spec("twice", repo="data", marks=marks, parallelism=2)
    # A twentieth of a second per datum: the job still runs when the second fault comes.
    spec["transform"]["cmd"][-1] = "sleep 0.05; " + spec["transform"]["cmd"][-1]
    create_pipeline(d, tmp_path, spec)  # type: ignore[arg-type]
    for _ in range(2):
        d.datumflow("w1", "worker", "--pipeline", "twice")

    # Every stream datumflow declared is on three servers.
    for stream in (subjects.DATUMS_STREAM, subjects.RESULTS_STREAM, subjects.COMMITS_STREAM):
        assert (await stream_info(d.nats.url, stream)).config.num_replicas == 3

    async def processed() -> int:
        jobs = await harness.jobs_if_reachable(d, "twice")  # type: ignore[arg-type]
        return jobs[0].data_processed if jobs else 0

    async def rejoined(stream: str) -> bool:
        info = await stream_info(d.nats.url, stream)
        peers = info.cluster.replicas if info.cluster else []
        return len(peers) == 2 and all(p.current for p in peers)

    # The stream's leader, a fifth of the way through; restarted once another is elected.
    await eventually(lambda: _at_least(processed, DATUMS // 5), timeout=60, what="a fifth done")
    leader = d.nats.node(await d.nats.leader(subjects.DATUMS_STREAM))
    killed = time.monotonic()
    leader.kill()
    new_leader = await d.nats.leader(subjects.DATUMS_STREAM, timeout=60)
    election = time.monotonic() - killed
    assert new_leader != leader.name
    d.nats.start_node(leader)
    await eventually(
        lambda: rejoined(subjects.DATUMS_STREAM),
        timeout=60,
        what=f"{leader.name} to rejoin the stream",
    )

    # Then the leader of the workers' consumer (which may be another server), with the job still
    # running; restarted at once.
    durable = subjects.worker_consumer("twice")
    assert await processed() < DATUMS, "the job ended before the second fault"
    consumer_leader = d.nats.node(await d.nats.consumer_leader(subjects.DATUMS_STREAM, durable))
    killed = time.monotonic()
    consumer_leader.kill()
    new_consumer_leader = await d.nats.consumer_leader(subjects.DATUMS_STREAM, durable, timeout=60)
    consumer_election = time.monotonic() - killed
    assert new_consumer_leader != consumer_leader.name
    d.nats.start_node(consumer_leader)

    job = await harness.wait_for_job(d, "twice", timeout=180)  # type: ignore[arg-type]
    figures = await harness.verify_exact(
        d,  # type: ignore[arg-type]
        "twice",
        data,
        job,
        marks=marks,
        scenario="stream leader, then consumer leader SIGKILL",
        faults={"DF_DATUMS leader SIGKILL": 1, "worker consumer leader SIGKILL": 1},
        started=started,
    )
    log.warning(
        "DF_DATUMS leader %s killed, %s elected after %.1fs; consumer leader %s killed, %s"
        " elected after %.1fs; job of %d datums in %.1fs",
        leader.name,
        new_leader,
        election,
        consumer_leader.name,
        new_consumer_leader,
        consumer_election,
        DATUMS,
        figures.seconds,
    )
    await eventually(
        lambda: rejoined(subjects.DATUMS_STREAM),
        timeout=60,
        what=f"{consumer_leader.name} to rejoin the stream",
    )


async def _at_least(count: Callable[[], Awaitable[int]], least: int) -> bool:
    return await count() >= least


def _from_host(nats: NatsCluster, address: str) -> int:
    """Messages the broker's servers have received from clients at `address` (their /connz)."""
    total = 0
    for node in nats.nodes:
        if not node.running:
            continue
        url = f"http://{node.host}:{node.monitor_port}/connz?limit=1024"
        with urllib.request.urlopen(url, timeout=2) as resp:
            connz = json.load(resp)
        total += sum(c["in_msgs"] for c in connz.get("connections") or [] if c["ip"] == address)
    return total


async def test_late_results_of_a_worker_host_cut_off_change_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The host of two workers is cut off the network for longer than ack_wait while they hold
    datums: those are given to the workers of another host, the job ends without them, and when
    the host comes back its late results and acks (which NATS accepts) change nothing."""
    d = deployment
    started = time.monotonic()
    d.datumflow("cp", "up")
    await eventually(
        lambda: asyncio.to_thread(lambda: (d.root / "cp" / "instance.json").exists()),
        what="datumflow up on cp",
    )
    marks = tmp_path / "marks"
    marks.mkdir()
    data = harness.make_dataset(DATUMS, seed=12)
    await put_files(d, "data", data.files)  # type: ignore[arg-type]
    spec = harness.pipeline_spec("twice", repo="data", marks=marks, parallelism=2)
    # A tenth of a second per datum: the workers of the cut host surely hold one when it is cut.
    spec["transform"]["cmd"][-1] = "sleep 0.1; " + spec["transform"]["cmd"][-1]
    create_pipeline(d, tmp_path, spec)  # type: ignore[arg-type]
    for _ in range(2):
        d.datumflow("w1", "worker", "--pipeline", "twice")

    async def progressed() -> bool:
        jobs = await harness.jobs_if_reachable(d, "twice")  # type: ignore[arg-type]
        return bool(jobs) and jobs[0].data_processed >= DATUMS // 5  # type: ignore[index]

    await eventually(progressed, timeout=60, what="a fifth of the job done")
    w1 = d.lab["w1"]
    w1.cut()
    cut = time.monotonic()
    before = await asyncio.to_thread(_from_host, d.nats, w1.address)
    job = await harness.wait_for_job(d, "twice", timeout=120)  # type: ignore[arg-type]
    assert time.monotonic() - cut > float(ACK_WAIT), "the job ended before a redelivery"
    w1.heal()
    await eventually(
        lambda: asyncio.to_thread(lambda: _from_host(d.nats, w1.address) > before),
        # The cut-off clients find their servers again only after giving the old connection up.
        timeout=120,
        what="the cut-off host's late messages to reach the broker",
    )
    figures = await harness.verify_exact(
        d,  # type: ignore[arg-type]
        "twice",
        data,
        job,
        marks=marks,
        scenario="worker host cut off past ack_wait",
        faults={"worker host link cut": 1},
        started=started,
    )
    # The datums the cut-off workers held ran twice, once there and once elsewhere.
    assert figures.rerun_datums >= 1, figures
    async with d.api() as api:
        (after,) = [j for j in await api.pipelines.list_jobs("twice") if j.id == job.id]
    assert after == job
    log.warning(
        "worker host cut for %.1fs; %d datums ran twice; job of %d datums in %.1fs",
        time.monotonic() - cut,
        figures.rerun_datums,
        DATUMS,
        figures.seconds,
    )


async def test_a_job_survives_its_stream_leader_partitioned_for_30s(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The host of the DF_DATUMS leader is cut off the network for 30 s mid-job: the two others
    elect a leader, the clients of the cut-off server move to them, and when the host comes back
    its server rejoins as a follower."""
    d = deployment
    started = time.monotonic()
    d.datumflow("cp", "up")
    await eventually(
        lambda: asyncio.to_thread(lambda: (d.root / "cp" / "instance.json").exists()),
        what="datumflow up on cp",
    )
    marks = tmp_path / "marks"
    marks.mkdir()
    data = harness.make_dataset(DATUMS, seed=13)
    await put_files(d, "data", data.files)  # type: ignore[arg-type]
    spec = harness.pipeline_spec("twice", repo="data", marks=marks, parallelism=2)
    create_pipeline(d, tmp_path, spec)  # type: ignore[arg-type]
    for _ in range(2):
        d.datumflow("w1", "worker", "--pipeline", "twice")

    async def processed() -> int:
        jobs = await harness.jobs_if_reachable(d, "twice")  # type: ignore[arg-type]
        return jobs[0].data_processed if jobs else 0

    await eventually(lambda: _at_least(processed, DATUMS // 5), timeout=60, what="a fifth done")
    leader = d.nats.node(await d.nats.leader(subjects.DATUMS_STREAM))
    host = d.lab[leader.name]
    host.cut()
    cut = time.monotonic()
    try:
        # Asked of the two others: they elect a leader of their own while the third is away.
        others = [n for n in d.nats.nodes if n is not leader]
        survivors = NatsCluster(others)
        new_leader = await survivors.leader(subjects.DATUMS_STREAM, timeout=60)
        election = time.monotonic() - cut
        assert new_leader != leader.name
        await eventually(
            lambda: asyncio.sleep(0, time.monotonic() - cut >= 30), timeout=60, what="30 s"
        )
    finally:
        host.heal()

    job = await harness.wait_for_job(d, "twice", timeout=180)  # type: ignore[arg-type]
    figures = await harness.verify_exact(
        d,  # type: ignore[arg-type]
        "twice",
        data,
        job,
        marks=marks,
        scenario="stream leader partitioned 30 s",
        faults={"DF_DATUMS leader host cut off for 30 s": 1},
        started=started,
    )

    async def rejoined() -> bool:
        info = await stream_info(d.nats.url, subjects.DATUMS_STREAM)
        peers = info.cluster.replicas if info.cluster else []
        return len(peers) == 2 and all(p.current for p in peers)

    await eventually(rejoined, timeout=60, what=f"{leader.name} to rejoin the stream")
    log.warning(
        "DF_DATUMS leader %s cut off for 30 s, %s elected after %.1fs; %d datums ran twice;"
        " job of %d datums in %.1fs",
        leader.name,
        new_leader,
        election,
        figures.rerun_datums,
        DATUMS,
        figures.seconds,
    )


async def test_a_job_survives_a_rolling_restart_of_the_three_servers(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Each nats-server in turn is stopped (SIGTERM) and started again, the next only once the
    restarted one has caught up with the datums stream, as an upgrade of the cluster would go."""
    d = deployment
    started = time.monotonic()
    d.datumflow("cp", "up")
    await eventually(
        lambda: asyncio.to_thread(lambda: (d.root / "cp" / "instance.json").exists()),
        what="datumflow up on cp",
    )
    marks = tmp_path / "marks"
    marks.mkdir()
    data = harness.make_dataset(DATUMS, seed=14)
    await put_files(d, "data", data.files)  # type: ignore[arg-type]
    spec = harness.pipeline_spec("twice", repo="data", marks=marks, parallelism=2)
    # A tenth of a second per datum: the job runs through the restarts.
    spec["transform"]["cmd"][-1] = "sleep 0.1; " + spec["transform"]["cmd"][-1]
    create_pipeline(d, tmp_path, spec)  # type: ignore[arg-type]
    for _ in range(2):
        d.datumflow("w1", "worker", "--pipeline", "twice")

    async def processed() -> int:
        jobs = await harness.jobs_if_reachable(d, "twice")  # type: ignore[arg-type]
        return jobs[0].data_processed if jobs else 0

    async def caught_up() -> bool:
        info = await stream_info(d.nats.url, subjects.DATUMS_STREAM)
        peers = info.cluster.replicas if info.cluster else []
        return len(peers) == 2 and all(p.current for p in peers)

    await eventually(lambda: _at_least(processed, DATUMS // 10), timeout=60, what="a tenth done")
    done_at_start = await processed()
    assert done_at_start < DATUMS, "the job ended before the restarts"
    rolled = time.monotonic()
    for node in d.nats.nodes:
        node.stop()
        d.nats.start_node(node)
        await d.nats.wait_healthy()
        await eventually(caught_up, timeout=60, what=f"{node.name} to catch up")
    rolling = time.monotonic() - rolled

    job = await harness.wait_for_job(d, "twice", timeout=180)  # type: ignore[arg-type]
    figures = await harness.verify_exact(
        d,  # type: ignore[arg-type]
        "twice",
        data,
        job,
        marks=marks,
        scenario="rolling restart of the three servers",
        faults={"nats-server stopped and started": 3},
        started=started,
    )
    log.warning(
        "rolling restart in %.1fs, from %d of %d datums done; %d datums ran twice; job in %.1fs",
        rolling,
        done_at_start,
        DATUMS,
        figures.rerun_datums,
        figures.seconds,
    )
