"""Metrics: a real Prometheus server scrapes the address `datumflow up` serves while jobs run, and
its PromQL answers equal the jobs' own figures; the Grafana dashboard names only metrics the code
defines; the object store's retries are counted; `metrics=off` serves nothing."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from datumflow import metrics
from datumflow.broker.messages import DatumResult, DatumStats, JobPlanned
from datumflow.broker.records import JobInfo
from datumflow.errors import StorageError
from datumflow.functions.job_metrics import job_ended
from datumflow.functions.tally import Tally
from datumflow.functions.worker import sandbox
from datumflow.metrics import observe_many
from datumflow.runtime.embedded import read_instance
from datumflow.settings import Settings
from datumflow.storage.retrying import RetryingStore
from tests.helpers import (
    REPO_ROOT,
    Cluster,
    commit,
    create_pipeline,
    eventually,
    put_files,
    wait_job_done,
    wait_until,
)
from tests.s3server import free_port

PROMETHEUS = "/usr/bin/prometheus"
DASHBOARD = REPO_ROOT / "manifests" / "grafana" / "datumflow-dashboard.json"


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Start the real Prometheus (Debian's package) scraping a target every second; yields a
    function that starts it on a metrics URL and returns its API's base URL."""
    if shutil.which(PROMETHEUS) is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    started: list[subprocess.Popen[bytes]] = []

    def start(metrics_url: str) -> str:
        target = urllib.parse.urlsplit(metrics_url)
        config = tmp_path / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "datumflow",
                            "metrics_path": target.path,
                            "static_configs": [{"targets": [target.netloc]}],
                        }
                    ],
                }
            )
        )
        address = f"127.0.0.1:{free_port()}"
        with open(tmp_path / "prometheus.log", "ab") as log:
            started.append(
                subprocess.Popen(
                    [
                        PROMETHEUS,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address={address}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
        base = f"http://{address}"
        wait_until(lambda: _get(f"{base}/-/ready") is not None, what="prometheus to be ready")
        return base

    try:
        yield start
    finally:
        for process in started:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return bytes(resp.read())
    except OSError:
        return None


def query(base: str, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
    """An instant query's result: each series' labels (sorted, without __name__) → its value."""
    body = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    if body is None:
        return {}
    doc = json.loads(body)
    assert doc["status"] == "success", doc
    return {
        tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")): float(
            r["value"][1]
        )
        for r in doc["data"]["result"]
    }


@pytest.mark.asyncio
async def test_prometheus_counts_what_the_jobs_counted(
    cluster: Cluster, tmp_path: Path, prometheus: Callable[[str], str]
) -> None:
    instance = read_instance(cluster.home)
    assert instance is not None and instance.metrics_url.startswith("http://127.0.0.1:")
    assert f"metrics of every datumflow process: {instance.metrics_url}" in cluster.log("up")
    base = prometheus(instance.metrics_url)

    # Two jobs: four datums of which one fails, then one more file, whose job skips nothing
    # (the first job failed) and fails again on the same datum; and a pipeline that succeeds,
    # then skips what it did.
    files = {"/a": b"a", "/b": b"b", "/poison": b"p", "/c": b"c"}
    await put_files(cluster, "numbers", files)
    picky = (
        'n=$(basename /pfs/numbers/*); [ "$n" != poison ] || exit 3; cp /pfs/numbers/* /pfs/out/'
    )
    for name, cmd in (("picky", picky), ("copy", "cp /pfs/numbers/* /pfs/out/")):
        create_pipeline(
            cluster,
            tmp_path,
            {
                "pipeline": {"name": name},
                "input": {"pfs": {"repo": "numbers", "glob": "/*"}},
                "transform": {"cmd": ["sh", "-c", cmd]},
                "datum_tries": 1,
                # Workers go back to zero a second after the last lag: the counts must stay. One
                # at most: a scale-down from two to one may stop a worker with datums of its set
                # not begun, which go back, a delivery spent (with datum_tries 1: failed).
                "autoscaling": True,
                "parallelism_spec": {"constant": 1},
                "scaling": {"cooldown_period": 1, "polling_interval": 0.5},
            },
        )
    await wait_job_done(cluster, "picky")
    await wait_job_done(cluster, "copy")
    await commit(cluster, "numbers", {"/d": b"d"})
    jobs = {name: await wait_job_done(cluster, name, count=2) for name in ("picky", "copy")}
    assert [j.state for j in jobs["picky"]] == ["failure", "failure"]
    assert [j.state for j in jobs["copy"]] == ["success", "success"]

    expected: dict[tuple[tuple[str, str], ...], float] = {}
    for name, done in jobs.items():
        for state, attr in (
            ("success", "data_processed"),
            ("skipped", "data_skipped"),
            ("failed", "data_failed"),
            ("recovered", "data_recovered"),
        ):
            total = sum(getattr(j, attr) for j in done)
            if total:
                expected[(("pipeline", name), ("state", state))] = total
    assert expected[(("pipeline", "copy"), ("state", "skipped"))] == 4
    assert expected[(("pipeline", "picky"), ("state", "failed"))] == 2, jobs["picky"]

    datums = "sum by (pipeline, state) (datumflow_datums_total)"
    await eventually(
        lambda: query(base, datums),
        until=lambda got: got == expected,
        timeout=30,
        interval=0.5,
        what=f"PromQL {datums} to equal the jobs' figures {expected}",
    )
    # The rest of the job's figures, as Prometheus sees them.
    jobs_by_state = query(base, "sum by (pipeline, state) (datumflow_jobs_total)")
    assert jobs_by_state == {
        (("pipeline", "picky"), ("state", "failure")): 2,
        (("pipeline", "copy"), ("state", "success")): 2,
    }
    ran = {
        (("pipeline", name),): sum(j.data_processed + j.data_failed for j in done)
        for name, done in jobs.items()
    }
    assert ran == {(("pipeline", "picky"),): 4 + 5, (("pipeline", "copy"),): 4 + 1}
    process = "sum by (pipeline) (datumflow_datum_process_seconds_count)"
    assert query(base, process) == ran
    assert query(base, "sum by (pipeline) (datumflow_datum_attempts_total)") == ran
    planned = query(base, "sum by (pipeline) (datumflow_planner_datums_total)")
    assert planned == {
        (("pipeline", name),): sum(j.data_total for j in done) for name, done in jobs.items()
    }
    moved = query(base, "sum by (pipeline) (datumflow_datum_upload_bytes_total)")
    assert moved[(("pipeline", "copy"),)] == 5  # one byte a file, each copied once
    assert query(base, "datumflow_job_duration_seconds_count") != {}
    # The lag of both pipelines and their workers, from the committer and `up`'s scaler.
    await eventually(
        lambda: query(base, "max by (pipeline) (datumflow_pipeline_pending)"),
        until=lambda got: got == {(("pipeline", "picky"),): 0, (("pipeline", "copy"),): 0},
        what="the pipelines' lag",
    )
    assert set(query(base, "max by (pipeline) (datumflow_workers_desired)")) == {
        (("pipeline", "picky"),),
        (("pipeline", "copy"),),
    }
    decisions = query(base, "sum by (direction) (datumflow_scaler_decisions_total)")
    assert decisions.get((("direction", "up"),), 0) >= 2  # each pipeline scaled up from zero

    # Every worker gone (scaled to zero), and the counts are still the jobs' figures.
    await eventually(
        # A worker that exited leaves no busy series behind (`up` drops its live gauge).
        lambda: query(
            base, "sum (datumflow_workers_running) + (sum (datumflow_worker_busy) or vector(0))"
        ),
        until=lambda got: got == {(): 0},
        timeout=30,
        interval=0.5,
        what="every worker to scale down to zero",
    )
    assert query(base, "sum by (pipeline) (datumflow_workers_desired)") == {
        (("pipeline", "picky"),): 0,
        (("pipeline", "copy"),): 0,
    }
    await eventually(
        lambda: query(base, datums),
        until=lambda got: got == expected,
        timeout=5,
        interval=0.5,
        what="the datum counts after the workers scaled to zero",
    )


def test_the_dashboard_names_only_metrics_the_code_defines() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    named = {name for e in exprs for name in _metric_names(e)}
    defined = metrics.metric_names()
    assert named, "the dashboard has no query"
    assert named <= defined, sorted(named - defined)
    # Every metric family is on the dashboard somewhere.
    families = {n.removesuffix("_total") for n in defined if not n.endswith(("_sum", "_count"))}
    shown = {n.removesuffix("_total").removesuffix("_bucket") for n in named}
    assert {f.removesuffix("_bucket") for f in families} <= shown, sorted(families - shown)


def _metric_names(expr: str) -> set[str]:
    import re

    return set(re.findall(r"\bdatumflow_[a-z_]+\b", expr))


class _Flaky:
    """A store whose calls fail `failures` times with an error that may pass, then work."""

    url = "flaky://"

    def __init__(self, failures: int) -> None:
        self.failures = failures

    async def get_bytes(self, key: str) -> bytes:
        if self.failures:
            self.failures -= 1
            raise StorageError("the store is busy")
        return b"ok"


@pytest.fixture
def recorded() -> Iterator[metrics.Metrics]:
    """Metrics recorded in this process, served on a free port, and off again after the test."""
    installed = metrics.install(Settings(metrics="127.0.0.1:0"))
    assert installed is not None and metrics.current() is installed
    try:
        yield installed
    finally:
        metrics.install(Settings(metrics="off"))
    assert metrics.current() is None


def _value(metric: object) -> float:
    return float(metric._value.get())  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_object_store_errors_and_retries_are_counted(recorded: metrics.Metrics) -> None:
    store = RetryingStore(_Flaky(2), first_delay=0.001, function="worker")  # type: ignore[arg-type]
    assert await store.get_bytes("k") == b"ok"
    gives_up = RetryingStore(_Flaky(9), attempts=2, first_delay=0.001, function="worker")  # type: ignore[arg-type]
    with pytest.raises(StorageError, match="gave up after 2 attempts"):
        await gives_up.get_bytes("k")
    errors = _value(recorded.store_errors.labels(function="worker"))
    retries = _value(recorded.store_retries.labels(function="worker"))
    assert (errors, retries) == (4, 3)
    # What a pod serves on its own: these, and its process's figures.
    served = (_get(metrics.served_url) or b"").decode()
    assert 'datumflow_object_store_errors_total{function="worker"} 4.0' in served
    assert "process_cpu_seconds_total" in served


def test_a_killed_job_counts_its_datums_without_a_result_as_killed(
    recorded: metrics.Metrics,
) -> None:
    tally = Tally()
    tally.add(JobPlanned(pipeline="p", job="j", data_total=10))
    stats = DatumStats(process_time=0.2, upload_bytes=7)
    for n, state in enumerate(["success", "success", "skipped", "failed", "recovered"]):
        tally.add(
            DatumResult(pipeline="p", job="j", datum=f"d{n}", state=state, stats=stats, attempts=2)  # type: ignore[arg-type]
        )
    record = JobInfo(pipeline="p", id="j", version=1, seq=1, created=100.0, finished=130.0)
    job_ended(pipeline="p", tally=tally, state="killed", record=record)
    counted = {
        state: _value(recorded.datums.labels(pipeline="p", state=state))
        for state in ("success", "skipped", "failed", "recovered", "killed")
    }
    assert counted == {"success": 2, "skipped": 1, "failed": 1, "recovered": 1, "killed": 5}
    assert _value(recorded.attempts.labels(pipeline="p")) == 2 * 4  # skipped datums ran nowhere
    assert _value(recorded.upload_bytes.labels(pipeline="p")) == 7 * 5
    assert _value(recorded.jobs.labels(pipeline="p", state="killed")) == 1
    durations = recorded.job_seconds.labels(pipeline="p", state="killed")
    assert durations._sum.get() == 30  # type: ignore[attr-defined]
    # No job of the pipeline runs now.
    assert _value(recorded.running_datums.labels(pipeline="p", state="success")) == 0


def test_observing_many_at_once_equals_observing_one_by_one(recorded: metrics.Metrics) -> None:
    samples = [0.0, 0.001, 0.0011, 0.3, 5.0, 7.5, 1e9, 0.05, 0.05]
    observe_many(recorded.process_seconds, "bulk", samples)
    for value in samples:
        recorded.process_seconds.labels(pipeline="single").observe(value)
    bulk, single = (recorded.process_seconds.labels(pipeline=p) for p in ("bulk", "single"))
    buckets = [b.get() for b in bulk._buckets]  # type: ignore[attr-defined]
    assert buckets == [b.get() for b in single._buckets]  # type: ignore[attr-defined]
    assert sum(buckets) == len(samples)
    assert bulk._sum.get() == pytest.approx(single._sum.get())  # type: ignore[attr-defined]


def test_metrics_off_serves_and_records_nothing(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(DATUMFLOW_METRICS="off")
    instance = read_instance(cluster.home)
    assert instance is not None and instance.metrics_url == ""
    assert not (cluster.home / "run" / "metrics").exists()


def test_up_refuses_a_metrics_address_in_use_saying_what_to_do(
    make_cluster: Callable[..., Cluster],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(RuntimeError, match=f"cannot serve metrics on {address}: .*, or to off"):
            make_cluster(DATUMFLOW_METRICS=address)


def test_a_bad_metrics_address_is_refused_saying_what_to_write() -> None:
    with pytest.raises(ValueError, match="DATUMFLOW_METRICS='9090': expected host:port"):
        Settings(metrics="9090")
    assert Settings(metrics=":9090").metrics == ":9090"


def test_metrics_urls_name_a_host_a_client_can_reach() -> None:
    assert metrics.metrics_url("127.0.0.1", 9464) == "http://127.0.0.1:9464/metrics"
    assert metrics.metrics_url("0.0.0.0", 9464) == "http://127.0.0.1:9464/metrics"
    assert metrics.metrics_url("::", 9464) == "http://127.0.0.1:9464/metrics"
    assert metrics.metrics_url(*metrics.split_address("[::1]:9464")) == (
        "http://[::1]:9464/metrics"
    )


def test_user_code_does_not_inherit_the_metrics_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/state/run/metrics")
    monkeypatch.setenv("PATH_FOR_USER_CODE", "kept")
    env = sandbox.user_environment({})
    assert "PROMETHEUS_MULTIPROC_DIR" not in env
    assert env["PATH_FOR_USER_CODE"] == "kept"
