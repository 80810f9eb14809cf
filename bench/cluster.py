"""A real `datumflow up` (embedded broker, supervisor, planner, committer, workers) in a private
home, and the figures the bench reads from it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from nats.aio.msg import Msg

from bench.deps import ROOT
from datumflow.broker import subjects
from datumflow.broker.records import JobInfo
from datumflow.cli.context import Api, open_api
from datumflow.pfs.pipelines import job_key
from datumflow.runtime.embedded import Instance, read_instance
from datumflow.settings import Settings


class Cluster:
    def __init__(self, home: Path, **extra_env: str) -> None:
        self.home = home
        self.extra_env = extra_env
        """DATUMFLOW_* settings of this `datumflow up` (e.g. DATUMFLOW_METRICS="off")."""
        self.process: subprocess.Popen[bytes] | None = None
        self.settings = Settings(home=str(home))

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
        # The workers import the bench's functions (transform.function = "bench.work:...").
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env["DATUMFLOW_HOME"] = str(self.home)
        env.update(self.extra_env)
        return env

    def start(self) -> Instance:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "up.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "datumflow.cli.main", "--home", str(self.home), "up"],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            instance = read_instance(self.home)
            if instance is not None and instance.pid == self.process.pid:
                return instance
            if self.process.poll() is not None:
                raise RuntimeError(f"datumflow up exited; see {self.home / 'up.log'}")
            time.sleep(0.05)
        raise RuntimeError("datumflow up did not start within 60s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def cli(self, *args: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "datumflow.cli.main", "--home", str(self.home), *args],
            env=self.env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=300,
        )

    def create_pipeline(self, spec: dict) -> None:
        path = self.home / f"{spec['pipeline']['name']}.json"
        path.write_text(json.dumps(spec))
        self.cli("create", "pipeline", "-f", str(path))

    @contextlib.asynccontextmanager
    async def api(self) -> AsyncIterator[Api]:
        async with open_api(self.settings) as api:
            yield api

    def pids(self, *words: str) -> list[int]:
        """Processes of this cluster whose command line holds every one of `words`."""
        found = []
        marker = f"DATUMFLOW_HOME={self.home}".encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ and all(w.encode() in argv for w in words):
                found.append(int(proc.name))
        return found


async def wait_workers(api: Api, pipeline: str, count: int, *, timeout: float = 60) -> None:
    """Until `count` workers wait on the pipeline's consumer: warm, bound, asking for datums."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            info = await api.broker.js.consumer_info(
                subjects.DATUMS_STREAM, subjects.worker_consumer(pipeline)
            )
            if (info.num_waiting or 0) >= count:
                return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{count} workers of {pipeline} did not start within {timeout:.0f}s")


async def wait_job(
    api: Api, pipeline: str, *, planned_only: bool = False, timeout: float = 1800
) -> JobInfo:
    """The pipeline's first job once it is done (or, with `planned_only`, once it is planned).

    The broker serves the bench's reads on the cores the measured work runs on, so the records are
    read when one of the pipeline's jobs is written (a plain subscription to their subjects sees
    each write) and at least every second, not polled four times a second. The figures come from
    the job record's times, not from when we notice."""
    deadline = time.monotonic() + timeout
    written = asyncio.Event()

    async def seen(msg: Msg) -> None:
        written.set()

    subject = subjects.kv_keys(subjects.JOBS_BUCKET, f"{pipeline}.")
    sub = await api.broker.nc.subscribe(subject, cb=seen)
    try:
        while time.monotonic() < deadline:
            written.clear()
            # Two key reads, not a listing of every job.
            head = await api.pipelines.heads.find(pipeline)
            job = None
            if head is not None and head.last_job:
                job = await api.pipelines.jobs.find(job_key(pipeline, head.last_job))
            if job is not None and (job.done or (planned_only and job.state != "created")):
                return job
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(written.wait(), 1.0)
            if written.is_set():
                # Seen as it reached the stream, which may not have stored it yet.
                await asyncio.sleep(0.02)
        raise RuntimeError(f"no job of {pipeline} finished within {timeout:.0f}s")
    finally:
        await sub.unsubscribe()


def memory_kb(pid: int, field: str) -> int:
    """VmRSS, VmHWM (peak resident), ... of a process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0
