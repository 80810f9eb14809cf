"""`datumflow up`: the broker, the functions and the workers of every pipeline, on one machine.

Each function is a child process running the same entry point a container runs (`datumflow
planner`, `datumflow worker --pipeline NAME`, ...). A child that dies is started again, with a
backoff. Worker counts follow KEDA's rule (datumflow.scaling) from the lag of each pipeline's
consumer, read from the monitoring endpoint as KEDA reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import msgspec

from datumflow.broker import subjects
from datumflow.broker.kv import Records
from datumflow.broker.records import PipelineInfo
from datumflow.runtime.embedded import EmbeddedServer, Instance, instance_path
from datumflow.runtime.service import connect_patiently
from datumflow.scaling import Scaler, ScalingError, lag_from_jsz, params_for
from datumflow.settings import Settings

log = logging.getLogger(__name__)


class Child:
    """One supervised process: restarted when it dies, stopped with SIGTERM."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], log_file: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_file = log_file
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.next_start = 0.0
        self.stopping = False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        with open(self.log_file, "ab") as out:  # noqa: ASYNC230 - a local append-open
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
            )
        log.info("started %s (pid %d)", self.name, self.process.pid)

    async def keep_alive(self) -> None:
        if self.stopping or self.alive or time.monotonic() < self.next_start:
            return
        if self.process is not None:
            self.restarts += 1
            log.warning(
                "%s exited with code %s; restarting (restart %d)",
                self.name,
                self.process.returncode,
                self.restarts,
            )
            # Back off from a crash loop, but come back fast from a one-off death.
            self.next_start = time.monotonic() + min(0.2 * 2 ** min(self.restarts, 6), 10)
            self.process = None
            return
        await self.start()

    def terminate(self) -> None:
        self.stopping = True
        if self.alive:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            await asyncio.wait_for(self.process.wait(), timeout=timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


class PipelineWorkers:
    """The worker processes of one pipeline and the scaler that sizes them."""

    def __init__(self, info: PipelineInfo) -> None:
        self.info = info
        self.params = params_for(info.spec, nodes=1, place="local")
        self.scaler = Scaler(self.params)
        self.workers: list[Child] = []
        self.draining: list[Child] = []
        self.desired = 0
        self.lag: int | None = None
        self.next_poll = 0.0

    @property
    def running(self) -> int:
        return sum(1 for w in self.workers if w.alive)


class Supervisor:
    def __init__(self, *, settings: Settings, embedded: bool) -> None:
        self.settings = settings
        self.home = Path(settings.home).resolve()
        self.embedded = embedded
        self.server: EmbeddedServer | None = None
        self.functions: list[Child] = []
        self.pipelines: dict[str, PipelineWorkers] = {}
        self.logs = self.home / "logs"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
        env.update(self.settings.secret_env())
        env["DATUMFLOW_HOME"] = str(self.home)
        return env

    def _child(self, name: str, *args: str) -> Child:
        argv = [sys.executable, "-m", "datumflow.cli.main", *args]
        return Child(name, argv, env=self._env(), log_file=self.logs / f"{name}.log")

    async def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.embedded:
            self.server = EmbeddedServer(
                store_dir=self.home / "nats",
                binary=os.environ.get("DATUMFLOW_NATS_SERVER", ""),
                log_file=self.logs / "nats-server.log",
            )
            self.server.start()
            await self.server.wait_ready()
            self.settings = msgspec.structs.replace(
                self.settings, nats_url=self.server.url, monitor_url=self.server.monitor
            )
        self.settings = msgspec.structs.replace(self.settings, storage=self.settings.storage_url())
        instance = Instance(
            nats_url=self.settings.nats_url,
            monitor_url=self.settings.monitor_url,
            storage=self.settings.storage,
            pid=os.getpid(),
            home=str(self.home),
        )
        instance_path(self.home).write_bytes(msgspec.json.encode(instance))
        self.broker = await connect_patiently(settings=self.settings, name="datumflow-supervisor")
        self.records = Records(self.broker, bucket=subjects.PIPELINES_BUCKET, type=PipelineInfo)
        self.functions = [self._child("planner", "planner"), self._child("committer", "committer")]
        for child in self.functions:
            await child.start()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            while not stop.is_set():
                await self.tick()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=0.25)
        finally:
            await self.shutdown()

    async def tick(self) -> None:
        for child in self.functions:
            await child.keep_alive()
        try:
            infos = {p.name: p for p in await self.records.all()}
        except Exception as exc:
            log.warning("listing pipelines: %s", exc)
            infos = {name: pw.info for name, pw in self.pipelines.items()}
        for name in list(self.pipelines):
            if name not in infos:
                await self._scale(self.pipelines.pop(name), 0)
        jsz: dict | None = None
        now = time.monotonic()
        for name, info in infos.items():
            pw = self.pipelines.get(name)
            if pw is None or pw.info.version != info.version:
                try:
                    fresh = PipelineWorkers(info)
                except ScalingError as exc:
                    log.error("pipeline %s: %s", name, exc)
                    continue
                if pw is not None:
                    fresh.workers, fresh.draining = pw.workers, pw.draining
                self.pipelines[name] = pw = fresh
            if now >= pw.next_poll:
                pw.next_poll = now + pw.params.polling_interval
                if jsz is None:
                    jsz = await self._jsz()
                pw.lag = lag_from_jsz(
                    jsz or {},
                    stream=subjects.DATUMS_STREAM,
                    consumer=subjects.worker_consumer(name),
                )
                pw.desired = pw.scaler.desired(pw.lag or 0, time.time())
            await self._scale(pw, pw.desired)
        self._write_status()

    async def _jsz(self) -> dict | None:
        url = f"http://{self.settings.monitor_url}/jsz?acc=$G&config=true&consumers=true"
        try:
            return await asyncio.to_thread(_get_json, url)
        except (OSError, ValueError) as exc:
            log.warning("reading lag from %s: %s", url, exc)
            return None

    async def _scale(self, pw: PipelineWorkers, desired: int) -> None:
        name = pw.info.name
        pw.draining = [w for w in pw.draining if w.alive]
        while len(pw.workers) < desired:
            index = len(pw.workers)
            pw.workers.append(self._child(f"worker-{name}-{index}", "worker", "--pipeline", name))
        while len(pw.workers) > desired:
            # Remove the newest first; a terminating worker finishes or hands back its datum.
            child = pw.workers.pop()
            child.terminate()
            pw.draining.append(child)
        for child in pw.workers:
            await child.keep_alive()

    def _write_status(self) -> None:
        status = {
            name: {
                "workers": pw.running,
                "desired": pw.desired,
                "lag": pw.lag,
                "autoscaling": pw.params.autoscaled,
            }
            for name, pw in self.pipelines.items()
        }
        tmp = self.home / "status.json.tmp"
        tmp.write_text(json.dumps(status))
        tmp.replace(self.home / "status.json")

    async def shutdown(self) -> None:
        children = [*self.functions]
        for pw in self.pipelines.values():
            children += pw.workers + pw.draining
        for child in children:
            child.terminate()
        await asyncio.gather(*(c.wait(timeout=self.settings.grace + 5) for c in children))
        with contextlib.suppress(Exception):
            await self.broker.close()
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
        with contextlib.suppress(FileNotFoundError):
            instance_path(self.home).unlink()


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.loads(resp.read())
