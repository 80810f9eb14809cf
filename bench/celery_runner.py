"""Running a scenario through Celery: a worker with `concurrency` processes, tasks sent, results
joined; the end is the last task's `date_done` as stored by the worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.deps import ROOT
from bench.scenarios import Measure, Scenario


def _env(redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["BENCH_REDIS_URL"] = redis_url
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run(scenario: Scenario, *, redis_url: str, logs: Path) -> Measure:
    os.environ["BENCH_REDIS_URL"] = redis_url
    from celery.result import ResultSet

    from bench.celery_app import TASKS, app

    queue = f"bench-{scenario.key}"
    node = f"{queue}@bench"
    log = open(logs / f"celery-{scenario.key}.log", "ab")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.celery_app",
            "worker",
            "-Q",
            queue,
            "-n",
            node,
            "-P",
            "prefork",
            f"--concurrency={scenario.workers}",
            "--prefetch-multiplier=1",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "WARNING",
        ],
        env=_env(redis_url),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        _wait_ready(app, node, worker)
        task = TASKS[scenario.kind]
        paths = [f"/in/f{i:07d}" for i in range(scenario.datums)]
        started = time.time()
        results = [task.apply_async(args=(p,), queue=queue) for p in paths]
        sent = time.time()
        # The end is each task's date_done, not when we notice: poll gently, so that the
        # polling takes no CPU from the workers.
        ResultSet(results).join_native(timeout=1800, interval=0.5)
        metas = list(app.backend.get_many([r.id for r in results], timeout=60, interval=0.5))
        done = [_when(meta["date_done"]) for _, meta in metas]
        ok = len(done) == scenario.datums and all(m["status"] == "SUCCESS" for _, m in metas)
        return Measure(
            system="celery",
            scenario=scenario.key,
            datums=scenario.datums,
            seconds=max(done) - started,
            ok=ok,
            extra={"send_seconds": sent - started},
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        app.control.purge()


def _wait_ready(app, node: str, worker: subprocess.Popen[bytes]) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the celery worker exited with code {worker.returncode}")
        if app.control.ping(destination=[node], timeout=0.5):
            return
    raise RuntimeError("the celery worker did not answer a ping within 60s")


def _when(value: object) -> float:
    if isinstance(value, datetime):
        moment = value
    else:
        moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
