"""Prometheus metrics: every metric datumflow exposes, and how a process exposes them.

Owns the metric definitions (docs/metrics.md lists them with their meaning), the one instance a
process records into, and the HTTP exposure the `metrics` setting asks for:

- under `datumflow up`, every child records into files under the directory `up` names
  (`metrics_dir`, prometheus-client's multiprocess mode) and `up` alone serves them all, on one
  address;
- a function run on its own (a container) serves its own /metrics on `metrics` (host:port);
- `metrics=off` records nothing anywhere.

`install` is called once, at a process's entry point, with its settings; code that records asks
`current()`, which is None when metrics are off, so that recording costs nothing then.
"""

from __future__ import annotations

import bisect
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from datumflow.errors import PermanentError
from datumflow.metrics_files import MetricsFiles
from datumflow.settings import Settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Histogram

# prometheus-client is imported where metrics are made or served, not with this module: every
# layer imports it to record, and a CLI command that records nothing should not pay for it.

TIME_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
"""Seconds, for a datum's download, process and upload times: from no-op datums to long ones."""
JOB_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
"""Seconds, for a job's duration."""
METRICS_PORT = 9090
"""The port every datumflow pod serves /metrics on (its named port `metrics`)."""
SCRAPE_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(METRICS_PORT),
    "prometheus.io/path": "/metrics",
}
"""The pod annotations a Prometheus configured the usual way (kubernetes_sd, role pod) scrapes by."""


class Metrics:
    """Every metric datumflow defines. Labels are pipeline-level, never job or datum ids."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        r = registry
        self.shared = registry is None
        """Recorded into files that `datumflow up` serves for all its processes (multiprocess
        mode), not served by this process alone."""
        # -- datums and jobs: counted by the committer when a job ends (see docs/metrics.md)
        self.datums = Counter(
            "datumflow_datums",
            "Datums of ended jobs, by final state.",
            ["pipeline", "state"],
            registry=r,
        )
        self.download_seconds = Histogram(
            "datumflow_datum_download_seconds",
            "Time a datum spent laying out its inputs.",
            ["pipeline"],
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.process_seconds = Histogram(
            "datumflow_datum_process_seconds",
            "Time a datum's user code ran.",
            ["pipeline"],
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.upload_seconds = Histogram(
            "datumflow_datum_upload_seconds",
            "Time a datum spent storing its outputs.",
            ["pipeline"],
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.download_bytes = Counter(
            "datumflow_datum_download_bytes",
            "Input bytes laid out for datums.",
            ["pipeline"],
            registry=r,
        )
        self.upload_bytes = Counter(
            "datumflow_datum_upload_bytes",
            "Output bytes stored by datums.",
            ["pipeline"],
            registry=r,
        )
        self.attempts = Counter(
            "datumflow_datum_attempts",
            "Attempts datums took, counted with their final result (1 per datum that ran once).",
            ["pipeline"],
            registry=r,
        )
        self.jobs = Counter(
            "datumflow_jobs", "Jobs ended, by final state.", ["pipeline", "state"], registry=r
        )
        self.job_seconds = Histogram(
            "datumflow_job_duration_seconds",
            "Time from a job's creation to its end, by final state.",
            ["pipeline", "state"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.running_datums = Gauge(
            "datumflow_running_job_datums",
            "Datums of the pipeline's running job counted so far, by state (a pipeline runs one"
            " job at a time).",
            ["pipeline", "state"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        # -- the planner
        self.planned = Counter(
            "datumflow_planner_datums",
            "Datums the planner queued (skipped ones included).",
            ["pipeline"],
            registry=r,
        )
        self.planning_rate = Gauge(
            "datumflow_planner_datums_per_second",
            "Datums per second of the pipeline's last planned job.",
            ["pipeline"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        # -- workers: live figures of their own
        self.redeliveries = Counter(
            "datumflow_worker_redeliveries",
            "Datums a worker received that had been delivered before.",
            ["pipeline"],
            registry=r,
        )
        self.busy = Gauge(
            "datumflow_worker_busy",
            "Workers holding datums now.",
            ["pipeline"],
            multiprocess_mode="livesum",
            registry=r,
        )
        # -- lag, workers and the scaler
        self.pending = Gauge(
            "datumflow_pipeline_pending",
            "Datums queued for the pipeline's workers, not yet delivered.",
            ["pipeline"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.ack_pending = Gauge(
            "datumflow_pipeline_ack_pending",
            "Datums delivered to the pipeline's workers and not yet acknowledged.",
            ["pipeline"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.redelivered = Gauge(
            "datumflow_pipeline_redelivered",
            "Datums of the pipeline's consumer delivered more than once and not yet acknowledged.",
            ["pipeline"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.workers_desired = Gauge(
            "datumflow_workers_desired",
            "Workers the local scaler wants for the pipeline (`datumflow up`).",
            ["pipeline"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.workers_running = Gauge(
            "datumflow_workers_running",
            "Worker processes of the pipeline alive (`datumflow up`).",
            ["pipeline"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.scaler_decisions = Counter(
            "datumflow_scaler_decisions",
            "Changes of the pipeline's desired workers made by the local scaler, by direction.",
            ["pipeline", "direction"],
            registry=r,
        )
        # -- dead letters and the object store
        self.dead_letters = Counter(
            "datumflow_dead_letters",
            "Messages kept as dead letters, by dead-letter subject.",
            ["subject"],
            registry=r,
        )
        self.store_errors = Counter(
            "datumflow_object_store_errors",
            "Object store calls that failed with an error that may pass, by function.",
            ["function"],
            registry=r,
        )
        self.store_retries = Counter(
            "datumflow_object_store_retries",
            "Object store calls tried again after such an error, by function.",
            ["function"],
            registry=r,
        )


def metric_names() -> set[str]:
    """The names of every series the metrics define, as PromQL sees them (with the suffixes
    Prometheus adds: _total, _bucket, _sum, _count)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    Metrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def observe_many(histogram: Histogram, pipeline: str, samples: list[float]) -> None:
    """Observe many values at once: counted into buckets here, then one increment per bucket,
    rather than a locked file write per value (a job of a million datums ends at once).

    prometheus-client has no such call: this uses its histogram's own buckets and sum (private
    names, stable for years); tests/test_metrics.py checks it against `observe`, value by value."""
    if not samples:
        return
    child = histogram.labels(pipeline=pipeline)
    bounds = child._upper_bounds
    counts = [0] * len(bounds)
    for value in samples:
        counts[bisect.bisect_left(bounds, value)] += 1
    for bucket, count in zip(child._buckets, counts, strict=True):
        if count:
            bucket.inc(count)
    child._sum.inc(sum(samples))


_current: Metrics | None = None
served_url = ""
"""Where this process serves its own metrics, once `install` started serving them."""


def current() -> Metrics | None:
    """The metrics this process records into; None when metrics are off or not installed."""
    return _current


def install(settings: Settings) -> Metrics | None:
    """Set up recording for this process, from its settings (at its entry point, once).

    With `metrics_dir` (a child of `datumflow up`) values go to that directory and `up` serves
    them; else with `metrics` set to host:port this process serves its own. Returns the metrics,
    or None when off."""
    global _current
    if settings.metrics == "off":
        _current = None
        return None
    if settings.metrics_dir:
        _multiprocess(Path(settings.metrics_dir))
        _current = Metrics(None)
        return _current
    if not settings.metrics:
        _current = None
        return None
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # the pod's own CPU, memory and open files
    _current = Metrics(registry)
    global served_url
    served_url = _serve(settings.metrics, registry)
    return _current


def serve_directory(files: MetricsFiles, *, address: str) -> tuple[Metrics, str]:
    """For `datumflow up`: start with an empty directory of `files`, record there too, and serve
    what every process records there on `address` (port 0: a free one). Returns the metrics and
    the URL served."""
    global _current
    directory = files.path
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    _multiprocess(directory)
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    files.collector(registry)
    url = _serve(address, registry)
    _current = Metrics(None)
    return _current, url


def _serve(address: str, registry: CollectorRegistry) -> str:
    """Serve `registry` on `address` in a thread of this process; the URL served."""
    from prometheus_client import start_http_server

    host, port = split_address(address)
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise PermanentError(
            f"cannot serve metrics on {address}: {exc.strerror or exc}; set DATUMFLOW_METRICS to"
            " another host:port (port 0: any free one), or to off"
        ) from None
    return metrics_url(host, server.server_port)


def metrics_url(host: str, port: int) -> str:
    """The URL to scrape a server bound to host:port (every address: this machine's loopback)."""
    shown = host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/metrics"


def _multiprocess(directory: Path) -> None:
    # prometheus-client's multiprocess values name their directory in this variable, which they
    # read when a value is made; this process's user code must not inherit it (the worker's
    # sandbox leaves it out).
    from prometheus_client import values

    os.environ.update(PROMETHEUS_MULTIPROC_DIR=str(directory))
    values.ValueClass = values.MultiProcessValue()


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (or `:port`, all interfaces) → (host, port); ValueError saying what to write."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(
            f"bad datumflow setting DATUMFLOW_METRICS={address!r}: expected host:port (port 0:"
            " any free port), or off"
        )
    return host.strip("[]") or "0.0.0.0", int(port)
