"""`datumflow up`: the broker, the functions and the workers of every pipeline, on one machine.

Each function is a child process running the same entry point a container runs (`datumflow
planner`, `committer`, `ingest`, `worker --pipeline NAME`). A child that dies is started again, with a
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from datumflow.broker import subjects
from datumflow.broker.kv import Records
from datumflow.broker.records import PipelineInfo
from datumflow.errors import SpecError
from datumflow.runtime.embedded import EmbeddedServer, Instance, instance_path, stop_with_parent
from datumflow.runtime.service import connect_patiently
from datumflow.scaling import (
    Scaler,
    ScalingError,
    ScalingParams,
    drain_seconds,
    lag_from_jsz,
    params_for,
    termination_grace_seconds,
)
from datumflow.settings import Settings
from datumflow.spec import PipelineSpec, parse_duration

log = logging.getLogger(__name__)
T = TypeVar("T")

# How often the supervisor looks at its children and the pipelines. Each pipeline's lag is read
# at its own polling interval (datumflow.scaling), on the first tick after it is due.
TICK_SECONDS = 0.25


class Child:
    """One supervised process: restarted when it dies, stopped with SIGTERM."""

    healthy_after = 30.0
    """A child that ran this long before dying was not crash-looping: it comes back at once."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], log_file: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_file = log_file
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.next_start = 0.0
        self.stopping = False
        self.stop_timeout = 10.0
        """Seconds between SIGTERM and SIGKILL at shutdown."""
        self.kill_at: float | None = None
        """When a child told to stop on its own (a scale-down) is killed if still alive."""
        self.index = 0
        self.busy_file: Path | None = None
        """Where a worker says it holds a datum (the file exists) or not."""

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        if self.busy_file is not None:
            # Left by a predecessor that died holding a datum.
            self.busy_file.unlink(missing_ok=True)
        with open(self.log_file, "ab") as out:  # noqa: ASYNC230 - a local append-open
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                # If `datumflow up` is SIGKILLed, its functions and workers stop too instead of
                # running on unsupervised.
                preexec_fn=stop_with_parent,
            )
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    async def keep_alive(self) -> None:
        if self.stopping or self.alive or time.monotonic() < self.next_start:
            return
        if self.process is not None:
            if time.monotonic() - self.started_at >= self.healthy_after:
                self.restarts = 0
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

    def terminate(self, *, kill_at: float | None = None) -> None:
        if self.alive and not self.stopping:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        self.stopping = True
        self.kill_at = kill_at

    def reap(self) -> bool:
        """For a child told to stop: True while it is alive; killed once past its deadline."""
        if not self.alive:
            if self.busy_file is not None:
                self.busy_file.unlink(missing_ok=True)
            return False
        if self.kill_at is not None and time.monotonic() > self.kill_at:
            assert self.process is not None
            log.warning("%s did not stop in time; killing it", self.name)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        return True

    async def wait(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            await asyncio.wait_for(self.process.wait(), timeout=timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


# A worker told to stop (scale-down, pipeline deleted) that is still alive this long after its
# SIGTERM is killed, as the kubelet does after terminationGracePeriodSeconds.
def _kill_deadline(grace: float) -> float:
    return time.monotonic() + termination_grace_seconds(grace)


def worker_grace(spec: PipelineSpec, *, cap: float) -> float:
    """Seconds a terminating worker of `spec` may keep working on its datum before handing it back.

    `scaling.drain_seconds` (the datum_timeout, which bounds a datum anyway) as in a pod, capped by
    the local `grace` setting: on a laptop a scale-down or a Ctrl-C should not wait 30 s.
    """
    try:
        timeout = parse_duration(spec.datum_timeout, field="datum_timeout")
    except SpecError:
        timeout = None
    return min(cap, drain_seconds(timeout))


def choose_to_stop(workers: Sequence[T], count: int, *, busy: Callable[[T], bool]) -> list[T]:
    """The `count` workers to stop on a scale-down: idle ones first, then the newest.

    Stopping an idle worker costs nothing; stopping a busy one costs its datum's work so far, or the
    grace period it takes to finish. The local form of the pod-deletion-cost annotation.
    """
    newest_first = list(reversed(workers))
    # A stable sort keeps newest-first among equals.
    return sorted(newest_first, key=busy)[: max(count, 0)]


class PipelineWorkers:
    """The worker processes of one pipeline and the scaler that sizes them."""

    def __init__(self, info: PipelineInfo, *, grace_cap: float, previous: PipelineWorkers | None):
        self.info = info
        self.error = ""
        self.params: ScalingParams | None = None
        self.scaler: Scaler | None = None
        try:
            self.params = params_for(info.spec, nodes=1, place="local")
        except ScalingError as exc:
            self.error = str(exc)
        self.grace = worker_grace(info.spec, cap=grace_cap)
        self.workers: list[Child] = []
        self.draining: list[Child] = []
        self.desired = 0
        self.lag: int | None = None
        self.next_poll = 0.0
        if previous is not None:
            # A new version of the pipeline: the running workers read the new spec with their
            # next datum, so they stay; so does the scaler's memory (cooldown, recent counts)
            # unless the scaling numbers themselves changed.
            self.workers, self.draining = previous.workers, previous.draining
            self.desired, self.lag = previous.desired, previous.lag
            if previous.params == self.params:
                self.scaler = previous.scaler
        if self.scaler is None and self.params is not None:
            self.scaler = Scaler(self.params)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def running(self) -> int:
        return sum(1 for w in self.workers if w.alive)

    @property
    def state(self) -> str:
        if self.error:
            return "failure"
        autoscaled = self.params is not None and self.params.autoscaled
        if autoscaled and self.desired == 0 and self.running == 0:
            return "standby"
        return "running"

    def free_index(self) -> int:
        # The lowest number no live worker of this pipeline uses: log files stay few and stable.
        used = {w.index for w in self.workers + self.draining}
        return next(i for i in range(len(used) + 1) if i not in used)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "workers": self.running,
            "desired": self.desired,
            "lag": self.lag,
            "draining": sum(1 for w in self.draining if w.alive),
            "max_workers": self.params.max_replicas if self.params else None,
            "autoscaling": self.params.autoscaled if self.params else self.info.spec.autoscaled,
            "reason": self.error,
            "updated": time.time(),
        }


class Supervisor:
    def __init__(self, *, settings: Settings, embedded: bool) -> None:
        self.settings = settings
        self.home = Path(settings.home).resolve()
        self.embedded = embedded
        self.server: EmbeddedServer | None = None
        self.functions: list[Child] = []
        self.pipelines: dict[str, PipelineWorkers] = {}
        self.retired: list[Child] = []
        """Workers of deleted pipelines, until they have exited."""
        self.logs = self.home / "logs"
        self.run_dir = self.home / "run"

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
        env.update(self.settings.secret_env())
        env["DATUMFLOW_HOME"] = str(self.home)
        env.update(extra)
        return env

    def _child(self, name: str, *args: str, **env: str) -> Child:
        argv = [sys.executable, "-m", "datumflow.cli.main", *args]
        return Child(name, argv, env=self._env(**env), log_file=self.logs / f"{name}.log")

    def _worker(self, pw: PipelineWorkers) -> Child:
        index = pw.free_index()
        name = f"worker-{pw.name}-{index}"
        busy_file = self.run_dir / f"{name}.busy"
        child = self._child(
            name,
            "worker",
            "--pipeline",
            pw.name,
            DATUMFLOW_GRACE=f"{pw.grace:g}",
            DATUMFLOW_BUSY_FILE=str(busy_file),
        )
        child.index, child.busy_file = index, busy_file
        child.stop_timeout = termination_grace_seconds(pw.grace)
        return child

    async def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
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
            s3_endpoint=self.settings.s3_endpoint,
            s3_region=self.settings.s3_region,
        )
        instance_path(self.home).write_bytes(msgspec.json.encode(instance))
        self.broker = await connect_patiently(settings=self.settings, name="datumflow-supervisor")
        self.records = Records(self.broker, bucket=subjects.PIPELINES_BUCKET, type=PipelineInfo)
        # The ingest function's own options (DATUMFLOW_INGEST_WINDOW, _SUBJECTS) are not settings:
        # passed through as they are.
        ingest_env = {k: v for k, v in os.environ.items() if k.startswith("DATUMFLOW_INGEST_")}
        self.functions = [
            self._child("planner", "planner"),
            self._child("committer", "committer"),
            self._child("ingest", "ingest", **ingest_env),
        ]
        for child in self.functions:
            child.stop_timeout = self.settings.grace + 5
            await child.start()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            while not stop.is_set():
                await self.tick()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=TICK_SECONDS)
        finally:
            await self.shutdown()

    async def tick(self) -> None:
        for child in self.functions:
            await child.keep_alive()
        infos = await self._pipeline_infos()
        for name in list(self.pipelines):
            if name not in infos:
                log.info("pipeline %s is gone; stopping its workers", name)
                gone = self.pipelines.pop(name)
                await self._scale(gone, 0)
                self.retired += gone.draining
        self.retired = [c for c in self.retired if c.reap()]
        jsz: dict | None = None
        jsz_read = False
        now = time.monotonic()
        for name, info in infos.items():
            pw = self.pipelines.get(name)
            if pw is None or pw.info.version != info.version:
                pw = PipelineWorkers(info, grace_cap=self.settings.grace, previous=pw)
                if pw.error:
                    log.error("pipeline %s: %s; it gets no workers", name, pw.error)
                self.pipelines[name] = pw
            if pw.scaler is None or pw.params is None:
                await self._scale(pw, 0)
                continue
            if now >= pw.next_poll:
                pw.next_poll = now + pw.params.polling_interval
                if not jsz_read:
                    jsz, jsz_read = await self._jsz(), True
                if jsz is not None:
                    # A consumer missing from /jsz (created a moment ago, or deleted) has
                    # nothing for workers to do: lag 0, never "the whole stream".
                    pw.lag = lag_from_jsz(
                        jsz, stream=subjects.DATUMS_STREAM, consumer=subjects.worker_consumer(name)
                    )
                    pw.desired = pw.scaler.desired(pw.lag or 0, now)
                # Else the lag is unknown: keep the workers we have, as KEDA does when its
                # scaler fails, rather than scale down on a missing number.
            await self._scale(pw, pw.desired)
        self._write_status()

    async def _pipeline_infos(self) -> dict[str, PipelineInfo]:
        """Every pipeline now; on doubt, the ones we know. Workers are only stopped for a pipeline
        whose record is really gone."""
        known = {name: pw.info for name, pw in self.pipelines.items()}
        try:
            infos = {p.name: p for p in await self.records.all()}
            # A listing is a KV watch plus a read per key. Once, under load, workers were stopped
            # and started again a second later with no delete in between, which a short listing
            # explains; so a record missing from the list is read directly before it counts as
            # deleted.
            for name in known.keys() - infos.keys():
                info = await self.records.find(name)
                if info is not None:
                    infos[name] = info
        except Exception as exc:
            log.warning("listing pipelines: %s", exc)
            return known
        return infos

    async def _jsz(self) -> dict | None:
        url = f"http://{self.settings.monitor_url}/jsz?acc=$G&config=true&consumers=true"
        try:
            return await asyncio.to_thread(_get_json, url)
        except (OSError, ValueError) as exc:
            log.warning("reading lag from %s: %s", url, exc)
            return None

    def _busy(self, child: Child) -> bool:
        """Whether a worker holds a datum now: its busy file exists (functions.pod_cost.BusyFile,
        named in DATUMFLOW_BUSY_FILE). A worker that writes none counts as idle, and the newest
        goes first, as before there was a marker."""
        if not child.alive:
            return False
        return child.busy_file is not None and child.busy_file.exists()

    async def _scale(self, pw: PipelineWorkers, desired: int) -> None:
        pw.draining = [w for w in pw.draining if w.reap()]
        while len(pw.workers) < desired:
            pw.workers.append(self._worker(pw))
        if len(pw.workers) > desired:
            for child in choose_to_stop(pw.workers, len(pw.workers) - desired, busy=self._busy):
                pw.workers.remove(child)
                # It stops fetching, and finishes or hands back the datum in hand (worker grace).
                child.terminate(kill_at=_kill_deadline(pw.grace))
                pw.draining.append(child)
        for child in pw.workers:
            await child.keep_alive()

    def _write_status(self) -> None:
        status = {name: pw.status() for name, pw in self.pipelines.items()}
        tmp = self.home / "status.json.tmp"
        tmp.write_text(json.dumps(status))
        tmp.replace(self.home / "status.json")

    async def shutdown(self) -> None:
        children = [*self.functions, *self.retired]
        for pw in self.pipelines.values():
            children += pw.workers + pw.draining
        for child in children:
            child.terminate()
        await asyncio.gather(*(c.wait(timeout=c.stop_timeout) for c in children))
        with contextlib.suppress(Exception):
            await self.broker.close()
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
        with contextlib.suppress(FileNotFoundError):
            instance_path(self.home).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.home / "status.json").unlink()


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.loads(resp.read())
