"""`datumflow up`: the broker, the functions and the workers of every pipeline, on one machine.

The supervisor starts the embedded broker (unless another is named), records the instance, runs the
functions as child processes (datumflow.runtime.child; `control_replicas` of each) and, every
tick, sizes each pipeline's workers (datumflow.runtime.pipeline_workers) from the lag of its
consumer (datumflow.runtime.lag).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import msgspec

from datumflow import metrics
from datumflow.broker import subjects
from datumflow.broker.kv import Records
from datumflow.broker.kv_changes import Changes
from datumflow.broker.records import PipelineInfo
from datumflow.metrics_files import MetricsFiles
from datumflow.runtime.child import Child
from datumflow.runtime.embedded import EmbeddedServer, Instance, instance_path
from datumflow.runtime.lag import LagReader
from datumflow.runtime.pipeline_workers import PipelineWorkers, choose_to_stop, kill_deadline
from datumflow.runtime.service import connect_patiently
from datumflow.runtime.status import CONSOLE_FILE, read_console_url
from datumflow.scaling import termination_grace_seconds
from datumflow.settings import Settings

log = logging.getLogger(__name__)

# How often the supervisor looks at its children and the pipelines. Each pipeline's lag is read
# at its own polling interval (datumflow.scaling), on the first tick after it is due.
TICK_SECONDS = 0.25
SHOWN_LAG_SECONDS = 5.0
"""Seconds between two readings of the lag of a pipeline that is not autoscaled: its workers do not
depend on it, it is only shown (`list pipeline`, the console), and each reading of /jsz costs the
broker as much as a dozen requests."""
RELIST_SECONDS = 2.0
"""Seconds after which the pipelines are listed again though no change to them was seen
(datumflow.broker.kv_changes): listing them on every tick was most of an idle broker's work."""


def function_names(function: str, replicas: int) -> list[str]:
    """The children (and log files) of one function: `planner`, or `planner-1`, `planner-2`."""
    if replicas == 1:
        return [function]
    return [f"{function}-{n}" for n in range(1, replicas + 1)]


class Supervisor:
    """Runs `datumflow up` until told to stop: the broker, the functions, every pipeline's workers."""

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
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_files = MetricsFiles(self.metrics_dir)
        self.metrics: metrics.Metrics | None = None
        self.metrics_url = ""
        """Where `up` serves the metrics of every process it runs; "" when they are off."""
        self.console_url = ""
        """The web console's URL, once it listens and it has been printed."""

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
        env.update(self.settings.secret_env())
        env["DATUMFLOW_HOME"] = str(self.home)
        if self.metrics is not None:
            env["DATUMFLOW_METRICS_DIR"] = str(self.metrics_dir)
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
        if self.settings.metrics != "off":
            self.metrics, self.metrics_url = metrics.serve_directory(
                self.metrics_files, address=self.settings.metrics or "127.0.0.1:0"
            )
            log.info("metrics of every datumflow process: %s", self.metrics_url)
        if self.embedded:
            self.server = EmbeddedServer(
                store_dir=self.home / "nats",
                binary=self.settings.nats_server,
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
            # Whether the embedded broker wants TLS and the password; an external broker's own
            # security is its operator's, not recorded here.
            secure=self.server is not None and self.server.secured,
            s3_endpoint=self.settings.s3_endpoint,
            s3_region=self.settings.s3_region,
            metrics_url=self.metrics_url,
        )
        instance_path(self.home).write_bytes(msgspec.json.encode(instance))
        self.broker = await connect_patiently(settings=self.settings, name="datumflow-supervisor")
        self.records = Records(self.broker, bucket=subjects.PIPELINES_BUCKET, type=PipelineInfo)
        self.changes = Changes(self.broker, bucket=subjects.PIPELINES_BUCKET, every=RELIST_SECONDS)
        await self.changes.start()
        self.lags = LagReader(monitor_url=self.settings.monitor_url, broker=self.broker)
        self.functions = [
            self._child(name, function)
            for function in ("planner", "committer", "ingest")
            for name in function_names(function, self.settings.control_replicas)
        ]
        (self.home / CONSOLE_FILE).unlink(missing_ok=True)  # a previous run's
        if self.settings.console:
            # The web console (datumflow.console), which writes its URL once it listens.
            self.functions.append(self._child("console", "console", "--url-home", str(self.home)))
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
        self._announce_console()
        infos = await self._pipeline_infos()
        for name in list(self.pipelines):
            if name not in infos:
                log.info("pipeline %s is gone; stopping its workers", name)
                gone = self.pipelines.pop(name)
                if self.metrics is not None:
                    self.metrics.workers_desired.labels(pipeline=name).set(0)
                    self.metrics.workers_running.labels(pipeline=name).set(0)
                await self._scale(gone, 0)
                self.retired += gone.draining
        self.retired = [c for c in self.retired if c.reap()]
        self.lags.next_tick()
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
                autoscaled = pw.params.autoscaled
                every = pw.params.polling_interval
                pw.next_poll = now + (every if autoscaled else max(every, SHOWN_LAG_SECONDS))
                lag = await self.lags.lag(name)
                if lag is not None:
                    pw.lag = lag
                if lag is not None or not autoscaled:
                    # A constant parallelism is applied whatever the lag, known or not.
                    desired = pw.scaler.desired(lag or 0, now)
                    if desired != pw.desired and self.metrics is not None:
                        direction = "up" if desired > pw.desired else "down"
                        self.metrics.scaler_decisions.labels(name, direction).inc()
                    pw.desired = desired
                # Else the lag is unknown: keep the workers we have, as KEDA does when its
                # scaler fails, rather than scale down on a missing number.
            await self._scale(pw, pw.desired)
        self._write_status()
        self._record()

    def _record(self) -> None:
        """The workers desired and running, per pipeline; the metrics files of children gone
        folded into the archive (datumflow.metrics_files)."""
        if self.metrics is None:
            return
        for name, pw in self.pipelines.items():
            self.metrics.workers_desired.labels(pipeline=name).set(pw.desired)
            self.metrics.workers_running.labels(pipeline=name).set(pw.running)
        children = [*self.functions, *self.retired]
        for pw in self.pipelines.values():
            children += pw.workers + pw.draining
        alive = {c.process.pid for c in children if c.alive and c.process is not None}
        self.metrics_files.fold_gone(alive=alive)

    async def _pipeline_infos(self) -> dict[str, PipelineInfo]:
        """Every pipeline now; on doubt, the ones we know. Workers are only stopped for a pipeline
        whose record is really gone."""
        known = {name: pw.info for name, pw in self.pipelines.items()}
        if not self.changes.due():
            return known
        self.changes.reading()
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
            self.changes.missed()
            return known
        return infos

    def _busy(self, child: Child) -> bool:
        """Whether a worker holds a datum now: its busy file exists
        (functions.worker.pod_cost.BusyFile, named in DATUMFLOW_BUSY_FILE). A worker that writes
        none counts as idle, and the newest goes first, as before there was a marker."""
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
                child.terminate(kill_at=kill_deadline(pw.grace))
                pw.draining.append(child)
        for child in pw.workers:
            await child.keep_alive()

    def _announce_console(self) -> None:
        url = read_console_url(self.home) if self.settings.console else ""
        if url and url != self.console_url:
            self.console_url = url
            print(f"datumflow console: {url}", flush=True)

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
            await self.changes.close()
        with contextlib.suppress(Exception):
            await self.broker.close()
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
        with contextlib.suppress(FileNotFoundError):
            instance_path(self.home).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.home / "status.json").unlink()
        (self.home / CONSOLE_FILE).unlink(missing_ok=True)
