"""Local autoscaling latency: first lag → first worker, and end of work → zero workers.

Starts a private `datumflow up` (embedded nats-server) in a temporary directory, creates an
autoscaled pipeline with the local defaults of datumflow.scaling (lag polled every second,
cooldown 10 s), and for each run commits a few slow datums to it while sampling, every 10 ms:

- the consumer's lag from /jsz, as KEDA and the supervisor read it;
- the pipeline's worker processes, from /proc;
- the moment each datum's user code starts (a file it touches).

It reports, per run and as a median:

- lag → process: first lag to the first worker process started by the supervisor;
- lag → datum: first lag to the first datum's user code running (the worker connected, fetched);
- idle → zero: the last moment with lag (the last datum acked) to no worker process left;
  this includes the cooldown, which is also printed.

    .venv/bin/python -m bench.autoscale_latency [--runs 5] [--datums 6] [--parallelism 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgspec

from datumflow.broker import subjects
from datumflow.broker.messages import FileRef
from datumflow.cli.context import open_api
from datumflow.runtime.embedded import read_instance
from datumflow.scaling import lag_from_jsz, params_for
from datumflow.settings import Settings
from datumflow.spec import load_spec

PIPELINE = "bench-autoscale"
REPO = "bench-autoscale-in"


class Run(msgspec.Struct, kw_only=True):
    lag_to_process: float
    lag_to_datum: float
    idle_to_zero: float
    peak_workers: int


def worker_processes(home: Path, pipeline: str) -> int:
    """Worker processes of `pipeline` under `home`, not counting their forked children."""
    pids: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"worker" not in argv or pipeline.encode() not in argv:
                continue
            if str(home).encode() not in (proc / "environ").read_bytes():
                continue
            status = (proc / "status").read_text()
        except OSError:
            continue
        ppid = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("PPid:"))
        pids[int(proc.name)] = ppid
    return sum(1 for ppid in pids.values() if ppid not in pids)


def read_lag(monitor: str) -> int:
    url = f"http://{monitor}/jsz?acc=$G&config=true&consumers=true"
    with urllib.request.urlopen(url, timeout=5) as resp:
        jsz = json.loads(resp.read())
    lag = lag_from_jsz(
        jsz, stream=subjects.DATUMS_STREAM, consumer=subjects.worker_consumer(PIPELINE)
    )
    return lag or 0


def start_up(home: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
    with open(home / "up.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "datumflow.cli.main", "--home", str(home), "up"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while read_instance(home) is None or read_instance(home).pid != proc.pid:  # type: ignore[union-attr]
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"datumflow up did not start; see {home / 'up.log'}")
        time.sleep(0.05)
    return proc


async def one_run(settings: Settings, home: Path, marks: Path, *, run: int, datums: int) -> Run:
    monitor = settings.monitor_url
    for mark in marks.iterdir():
        mark.unlink()
    # Standby first: no worker left from the run before.
    while True:
        if not worker_processes(home, PIPELINE) and not read_lag(monitor):
            break
        await asyncio.sleep(0.05)

    async with open_api(settings) as api:
        refs = []
        for i in range(datums):
            key, size = await api.store.put_bytes(f"run {run} datum {i}\n".encode())
            refs.append(FileRef(path=f"/run{run}/d{i}", size=size, hash=key))
        # New paths only: the datums of earlier runs are skipped, as unchanged.
        await api.repos.commit_files(REPO, "master", puts=refs)

    first_lag = first_process = first_datum = last_lag = None
    zero_at = None
    peak = 0
    while zero_at is None:
        now = time.time()
        lag = read_lag(monitor)
        processes = worker_processes(home, PIPELINE)
        peak = max(peak, processes)
        if lag and first_lag is None:
            first_lag = now
        if lag:
            last_lag = now
        if processes and first_process is None and first_lag is not None:
            first_process = now
        if first_datum is None:
            started = [float(p.read_text()) for p in marks.iterdir() if p.stat().st_size]
            if started:
                first_datum = min(started)
        if last_lag is not None and not lag and not processes and first_process is not None:
            zero_at = now
        await asyncio.sleep(0.01)
    assert first_lag is not None and first_process is not None and first_datum is not None
    assert last_lag is not None
    return Run(
        lag_to_process=first_process - first_lag,
        lag_to_datum=first_datum - first_lag,
        idle_to_zero=zero_at - last_lag,
        peak_workers=peak,
    )


async def bench(args: argparse.Namespace) -> list[Run]:
    home = Path(tempfile.mkdtemp(prefix="df-autoscale-"))
    marks = home / "marks"
    marks.mkdir()
    up = start_up(home)
    try:
        instance = read_instance(home)
        assert instance is not None
        settings = Settings(
            home=str(home),
            nats_url=instance.nats_url,
            monitor_url=instance.monitor_url,
            storage=instance.storage,
        )
        spec = load_spec(
            json.dumps(
                {
                    "pipeline": {"name": PIPELINE},
                    "input": {"pfs": {"repo": REPO, "glob": "/*/*"}},
                    "transform": {
                        "cmd": [
                            "sh",
                            "-c",
                            # The start time of the user code, then a little work.
                            'date +%s.%N > "$MARKS/$PACH_DATUM_ID";'
                            f" sleep {args.seconds}; cp -r /pfs/{REPO}/* /pfs/out/",
                        ],
                        "env": {"MARKS": str(marks)},
                    },
                    "parallelism_spec": {"constant": args.parallelism},
                    "autoscaling": True,
                }
            )
        )
        params = params_for(spec, nodes=1, place="local")
        async with open_api(settings) as api:
            await api.repos.create_repo(REPO)
            await api.pipelines.create(spec, ack_wait=settings.ack_wait)
        runs = []
        for run in range(args.runs):
            result = await one_run(settings, home, marks, run=run, datums=args.datums)
            runs.append(result)
            print(
                f"run {run}: lag→process {result.lag_to_process:.2f}s,"
                f" lag→datum {result.lag_to_datum:.2f}s,"
                f" idle→zero {result.idle_to_zero:.2f}s, peak {result.peak_workers} workers",
                flush=True,
            )
        print(
            f"\nlocal defaults: lag polled every {params.polling_interval:g}s,"
            f" cooldown {params.cooldown_period:g}s; {args.datums} datums of {args.seconds:g}s,"
            f" parallelism {args.parallelism}"
        )
        for field in ("lag_to_process", "lag_to_datum", "idle_to_zero"):
            values = [getattr(r, field) for r in runs]
            print(
                f"{field:15} median {statistics.median(values):.2f}s"
                f"  min {min(values):.2f}s  max {max(values):.2f}s"
            )
        return runs
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--datums", type=int, default=6)
    parser.add_argument("--parallelism", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.5, help="work per datum")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
