"""datumflow deployed across hosts made as network namespaces (tests/hosts.py): three nats-servers
clustered with JetStream on n1 to n3, moto's S3 server on `s3`, `datumflow up` (the control plane
and two workers) on `cp`, two more workers on `w1`; every stream, bucket and consumer on three
servers.

`Workload` runs the model pipeline of tests.faults.harness on it: each `job` commits a fresh
dataset (so the job has no datum to skip) and returns a `Job` that the fault tests drive, wait
for and verify (SUCCESS, exact figures, the output of a fault-free run).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from datumflow.broker import subjects
from datumflow.broker.records import JobInfo
from datumflow.cli.context import Api, open_api
from datumflow.settings import Settings
from tests.faults import harness
from tests.helpers import create_pipeline, eventually, put_files
from tests.hosts import Hosts
from tests.natscluster import NatsCluster, Node, stream_info
from tests.s3server import DUMMY_KEY, DUMMY_SECRET, make_bucket

HOSTS = ["n1", "n2", "n3", "s3", "cp", "w1"]
NATS_HOSTS = HOSTS[:3]
CONTROL = ("cp", "cp2")
"""The hosts of `datumflow up` where a test runs two control planes (cp2 is then in its HOSTS)."""
ACK_WAIT = "10"


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

    async def replicas_current(self, stream: str = subjects.DATUMS_STREAM) -> bool:
        """The stream has a leader and both other servers have caught up with it."""
        with contextlib.suppress(Exception):  # while the cluster settles, anything may fail
            info = await stream_info(self.nats.url, stream, timeout=2.0)
            peers = info.cluster.replicas if info.cluster else []
            return len(peers) == 2 and all(p.current for p in peers)
        return False


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def deployed(lab: Hosts, root: Path) -> AsyncIterator[Deployment]:
    """The nats cluster and moto started on their hosts; datumflow itself is the test's to start."""
    nodes = [
        Node(
            name=name,
            root=root / "nats",
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
            log=root / "moto.log",
        )
        await nats.wait_healthy()
        await eventually(
            lambda: asyncio.to_thread(_answers, s3 + "/moto-api/"), what="moto to listen"
        )
        bucket = make_bucket(s3)
        yield Deployment(lab, nats, root, storage=f"s3://{bucket}/df", s3=s3)
    finally:
        nats.stop()


class Workload:
    """The model pipeline on the deployment: `datumflow up` on cp, two more workers on w1."""

    def __init__(
        self, d: Deployment, tmp_path: Path, *, sleep: float, pipeline: str, datum_tries: int
    ) -> None:
        self.d = d
        self.tmp_path = tmp_path
        self.sleep = sleep
        self.pipeline = pipeline
        self.datum_tries = datum_tries
        self.repo = "data"
        self.marks = tmp_path / "marks"
        self.marks.mkdir(exist_ok=True)
        self.pace_file = tmp_path / "pace"
        self.jobs = 0

    @classmethod
    async def start(
        cls,
        d: Deployment,
        tmp_path: Path,
        *,
        sleep: float = 0.0,
        pipeline: str = "twice",
        datum_tries: int = 3,
        control: Sequence[str] = ("cp",),
    ) -> Workload:
        """`datumflow up` on each of the `control` hosts; `sleep` seconds of user code per datum
        keep a job running."""
        workload = cls(d, tmp_path, sleep=sleep, pipeline=pipeline, datum_tries=datum_tries)
        for host in control:
            await workload.up(host)
        return workload

    def pace(self, sleep: float) -> None:
        """Seconds of user code per datum from now on (a job kept running past a fault can go
        through the rest of its datums faster)."""
        staged = self.pace_file.with_suffix(".new")
        staged.write_text(f"{sleep}\n")
        staged.replace(self.pace_file)  # whole, never half-written, to the datums reading it

    async def up(self, host: str) -> None:
        """`datumflow up` on `host`: a control plane (and the local workers) more."""
        self.d.datumflow(host, "up")
        await eventually(
            lambda: asyncio.to_thread((self.d.root / host / "instance.json").exists),
            what=f"datumflow up on {host}",
        )

    async def job(self, datums: int, *, seed: int) -> Job:
        """Commit a fresh dataset of `datums` files; the first also makes the pipeline and starts
        the workers of w1."""
        data = harness.make_dataset(datums, seed=seed)
        first = self.jobs == 0
        started = time.monotonic()
        commit = await put_files(self.d, self.repo, data.files, create=first)  # type: ignore[arg-type]
        if first:
            spec = harness.pipeline_spec(
                self.pipeline,
                repo=self.repo,
                marks=self.marks,
                parallelism=2,
                datum_tries=self.datum_tries,
            )
            if self.sleep:
                # The pace file, once written (`pace`), sets the sleep of the datums started since.
                self.pace(self.sleep)
                spec["transform"]["cmd"][-1] = (
                    f'sleep "$(cat {self.pace_file})"; ' + spec["transform"]["cmd"][-1]
                )
            create_pipeline(self.d, self.tmp_path, spec)  # type: ignore[arg-type]
            for _ in range(2):
                self.d.datumflow("w1", "worker", "--pipeline", self.pipeline)
        self.jobs += 1
        return Job(self, data, commit=commit, started=started)


class Job:
    """One job of the workload, found by its input commit."""

    def __init__(
        self, workload: Workload, data: harness.Dataset, *, commit: str, started: float
    ) -> None:
        self.workload = workload
        self.d = workload.d
        self.data = data
        self.commit = commit
        self.started = started

    @property
    def size(self) -> int:
        return self.data.size

    async def info(self) -> JobInfo | None:
        jobs = await harness.jobs_if_reachable(self.d, self.workload.pipeline)  # type: ignore[arg-type]
        for job in jobs or []:
            if any(c.commit == self.commit for c in job.input_commits):
                return job
        return None

    async def processed(self) -> int:
        job = await self.info()
        return job.data_processed if job else 0

    async def reach(self, least: int, *, timeout: float = 60) -> int:
        """Until `least` datums are processed; how many are."""
        return await eventually(
            self.processed,
            until=lambda n: n >= least,
            timeout=timeout,
            interval=0.1,
            what=f"{least} datums of {self.size} processed",
        )

    async def wait(self, *, timeout: float = 180) -> JobInfo:
        try:
            return await eventually(
                self.info,
                until=lambda job: job is not None and job.done,
                timeout=timeout,
                interval=0.2,
                what=f"the job of {self.workload.pipeline} for commit {self.commit} to finish",
            )
        except AssertionError as failed:
            why = harness.diagnostics(self.d, self.workload.pipeline)  # type: ignore[arg-type]
            raise AssertionError(f"{failed}\n{why}") from None

    async def verify(
        self, job: JobInfo, *, scenario: str, faults: dict[str, int]
    ) -> harness.Figures:
        """SUCCESS, exact figures, the model's output, nothing left over; the figures."""
        return await harness.verify_exact(
            self.d,  # type: ignore[arg-type]
            self.workload.pipeline,
            self.data,
            job,
            marks=self.workload.marks,
            scenario=scenario,
            faults=faults,
            started=self.started,
        )
