"""What three replicas and JetStream's `sync_interval: always` cost datumflow, measured by hand
(not a test), side by side:

    .venv/bin/python -m tests.cluster.sync_cost [--datums 2000] [--rounds 3] [--only R3,R3-always]

Four setups: one standalone nats-server with every stream on it (DATUMFLOW_REPLICAS=1), and a
three-node cluster on loopback with every stream on all three (DATUMFLOW_REPLICAS=3), each with
nats-server's default (a flush to disk every 2 minutes) and with `sync_interval: always` (an fsync
after every write, on each server). `datumflow up` runs on it with a pipeline whose in-process
function does nothing, so that the broker is what the datums wait on. Each round runs one job on
each setup in turn, on a fresh broker, and prints datums/s from the commit to the job's end with
the load average; the end prints each setup's min, median and max.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from datumflow.broker.messages import FileRef
from datumflow.cli.context import open_api
from datumflow.settings import Settings
from tests.natscluster import NatsCluster

ROOT = Path(__file__).resolve().parents[2]
SETUPS = {
    # name: (servers and replicas, threads (GOMAXPROCS) of each, lines of its jetstream block)
    "R1": (1, 1, ""),
    "R1-3threads": (1, 3, ""),
    "R1-always": (1, 1, "sync_interval: always"),
    "R3": (3, 1, ""),
    "R3-always": (3, 1, "sync_interval: always"),
}


def _start_up(env: dict[str, str], *, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "datumflow.cli.main", "up"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _cpu_seconds(nats: NatsCluster) -> float:
    """CPU time (user and system) the broker's servers have used so far."""
    total = 0
    for node in nats.nodes:
        assert node.process is not None
        fields = Path(f"/proc/{node.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


async def one_job(
    root: Path, *, datums: int, replicas: int, threads: int, jetstream: str
) -> tuple[float, float]:
    """datums/s of one job of `datums` no-op datums on a fresh broker of `replicas` servers, and
    the broker's CPU seconds per 1,000 datums over the job. The servers run in this process's
    session: on a busy machine one server gets the CPU share three would. Each server has one
    thread (GOMAXPROCS) unless `threads` says otherwise: three servers have three, so R1-3threads
    gives one server as many."""
    nats = NatsCluster.on_loopback(
        root / "nats", size=replicas, jetstream=jetstream, own_sessions=False, threads=threads
    )
    nats.start()
    home = root / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
    env.update(
        DATUMFLOW_HOME=str(home),
        DATUMFLOW_NATS_URL=nats.url,
        DATUMFLOW_REPLICAS=str(replicas),
        DATUMFLOW_STORAGE=(root / "objects").as_uri(),
        PYTHONPATH=str(ROOT),
    )
    up: subprocess.Popen[bytes] | None = None
    try:
        await nats.wait_healthy()
        home.mkdir(parents=True)
        up = _start_up(env, log=root / "up.log")
        settings = Settings(
            home=str(home), nats_url=nats.url, replicas=replicas, storage=env["DATUMFLOW_STORAGE"]
        )
        async with open_api(settings) as api:
            await api.repos.create_repo("in")
            key, size = await api.store.put_bytes(b"datum\n")
            spec = root / "noop.json"
            spec.write_text(
                '{"pipeline": {"name": "noop"}, "input": {"pfs": {"repo": "in", "glob": "/*"}},'
                ' "transform": {"function": "bench.work:df_noop"},'
                ' "parallelism_spec": {"constant": 2}}'
            )
            await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "datumflow.cli.main", "create", "pipeline", "-f", str(spec)],
                env=env,
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            refs = [FileRef(path=f"/f{i:07d}", size=size, hash=key) for i in range(datums)]
            started = time.monotonic()
            cpu = _cpu_seconds(nats)
            await api.repos.commit_files("in", "master", puts=refs)
            deadline = started + 900
            while time.monotonic() < deadline:
                jobs = await api.pipelines.list_jobs("noop")
                if jobs and jobs[0].done:
                    assert jobs[0].state == "success", jobs[0]
                    rate = datums / (time.monotonic() - started)
                    return rate, (_cpu_seconds(nats) - cpu) * 1000 / datums
                await asyncio.sleep(0.25)
        raise RuntimeError("the job did not finish within 15 minutes")
    finally:
        if up is not None:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=60)
        nats.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datums", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(SETUPS), help="setups, comma-separated")
    args = parser.parse_args()
    chosen = {name: SETUPS[name] for name in args.only.split(",")}
    rates: dict[str, list[float]] = {name: [] for name in chosen}
    cpus: dict[str, list[float]] = {name: [] for name in chosen}
    loads: list[float] = []
    for round_ in range(args.rounds):
        for name, (replicas, threads, jetstream) in chosen.items():
            with tempfile.TemporaryDirectory(prefix="df-sync-") as tmp:
                rate, cpu = await one_job(
                    Path(tmp),
                    datums=args.datums,
                    replicas=replicas,
                    threads=threads,
                    jetstream=jetstream,
                )
            rates[name].append(rate)
            cpus[name].append(cpu)
            load = os.getloadavg()[0]
            loads.append(load)
            print(
                f"round {round_ + 1} {name}: {rate:.0f} datums/s, broker {cpu:.2f} CPU s per"
                f" 1,000 datums (load {load:.1f})",
                flush=True,
            )
    print(f"load average {min(loads):.1f} to {max(loads):.1f}")
    for name, values in rates.items():
        each = ", ".join(f"{v:.0f}" for v in values)
        print(
            f"{name}: {each} datums/s; min {min(values):.0f}, median"
            f" {statistics.median(values):.0f}, max {max(values):.0f}; broker CPU s per 1,000"
            f" datums {min(cpus[name]):.2f} to {max(cpus[name]):.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
