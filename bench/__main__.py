"""`python -m bench`: every scenario through every system, in one run, then the tables.

python -m bench                      # everything (about 3 minutes on 2 CPUs)
python -m bench --scale 0.1          # a tenth of the datums, for a quick look
python -m bench --only noop,cpu      # some: noop, cpu, sleep, ceiling, planning, cli, idle, metrics,
                                     # spawn (a process per datum against xargs -P)
                                     # batching (a datum_batching sh loop against a function)
python -m bench --systems datumflow  # some systems: datumflow, celery, pool
python -m bench --json out.json      # the measures as JSON too
python -m bench --repeat 3           # each scenario three times, the median reported
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from bench import deps, report
from bench.scenarios import PLANNING_BIG, PLANNING_FILES, Measure, scenarios

ALL = ("noop", "cpu", "sleep", "ceiling", "planning", "cli", "idle", "metrics", "spawn", "batching")


def _versions(redis_binary: str) -> dict[str, str]:
    out = {}
    for dist in ("nats-py", "celery", "redis"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if redis_binary:
        text = subprocess.run([redis_binary, "--version"], capture_output=True, text=True).stdout
        out["redis-server"] = next((w[2:] for w in text.split() if w.startswith("v=")), "?")
    from datumflow.runtime.embedded import server_binary

    text = subprocess.run([server_binary(), "--version"], capture_output=True, text=True).stdout
    out["nats-server"] = text.strip().rsplit(" ", 1)[-1]
    return out


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _wait_quiet(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
        time.sleep(5)
    _say(f"load average {os.getloadavg()[0]:.2f}; starting")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(ALL), help="scenarios, comma-separated")
    parser.add_argument("--systems", default="datumflow,celery,pool", help="comma-separated")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the datum counts")
    parser.add_argument("--no-million", action="store_true", help="skip the 1,000,000 plan")
    parser.add_argument("--json", type=Path, help="also write the measures here")
    parser.add_argument(
        "--repeat", type=int, default=1, help="run each scenario this many times; report medians"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the 1-minute load average to drop below 1",
    )
    args = parser.parse_args(argv)
    if args.wait_quiet > 0:
        _wait_quiet(args.wait_quiet)
    only = set(args.only.split(","))
    systems = set(args.systems.split(","))
    chosen = [s for s in scenarios(args.scale) if s.key in only]

    redis_binary = ""
    if "celery" in systems and chosen:
        deps.ensure_celery()
        redis_binary = deps.redis_server()

    from bench import ceiling, celery_runner, datumflow_runner, pool_runner
    from bench.cluster import Cluster
    from bench.redis_server import RedisServer

    work = Path(tempfile.mkdtemp(prefix="datumflow-bench-"))
    logs = work / "logs"
    logs.mkdir()
    measures: list[Measure] = []

    def keep(m: Measure) -> None:
        # The load right after the measure: other work on the machine skews every figure.
        m.extra["load_1min"] = os.getloadavg()[0]
        measures.append(m)
        state = "" if m.ok else f"  FAILED {m.note}"
        _say(
            f"{m.system:>10} {m.scenario:<14} {m.datums:>9,} in {m.seconds:8.2f} s"
            f" = {m.rate:>10,.0f}/s  (load {m.extra['load_1min']:.1f}){state}"
        )

    redis = None
    try:
        if "celery" in systems and chosen:
            redis = RedisServer(binary=redis_binary, workdir=work / "redis")
            redis.start()
            _say(f"redis-server on {redis.url}")
        # Scenario by scenario, the systems one after another: a change in the machine's load
        # over the run then weighs on every system alike. Each datumflow run gets a fresh
        # `datumflow up`, as nothing of it should idle beside the others' runs.
        runs = [(s, run) for s in chosen for run in range(max(args.repeat, 1))]
        for s, run in runs:
            if "datumflow" in systems:
                cluster = Cluster(work / f"datumflow-{s.key}-{run}")
                instance = cluster.start()
                try:
                    keep(asyncio.run(datumflow_runner.run_scenario(cluster, s)))
                    if s.key == "noop" and "ceiling" in only:
                        keep(ceiling.run(instance.nats_url, datums=s.datums, workers=s.workers))
                finally:
                    cluster.stop()
            if redis is not None:
                keep(celery_runner.run(s, redis_url=redis.url, logs=logs))
            if "pool" in systems:
                keep(pool_runner.run(s))
        if redis is not None:
            redis.stop()
            redis = None
        if "planning" in only and "datumflow" in systems:
            sizes = [max(int(PLANNING_FILES * args.scale), 1000)]
            if not args.no_million:
                sizes.append(max(int(PLANNING_BIG * args.scale), 1000))
            for files in sizes:
                # A fresh datumflow for each: the planner's peak memory is its own.
                cluster = Cluster(work / f"plan-{files}")
                cluster.start()
                try:
                    keep(asyncio.run(datumflow_runner.run_planning(cluster, files, name="plan")))
                finally:
                    cluster.stop()
        if chosen or "planning" in only:
            print(report.tables(measures, chosen, _versions(redis_binary), args.repeat))
        if "cli" in only and "datumflow" in systems:
            from bench import cli_latency

            latencies = cli_latency.run(work=work, repeat=max(args.repeat, 5))
            print(cli_latency.table(latencies))
        if "idle" in only and "datumflow" in systems:
            from bench import idle_cpu

            print(idle_cpu.table(idle_cpu.run(work=work)))
        if "metrics" in only and "datumflow" in systems:
            from bench import metrics_cost

            costs = metrics_cost.run(work=work, repeat=args.repeat, scale=args.scale)
            print(metrics_cost.table(costs, metrics_cost.committer_cost(work=work)))
        if "spawn" in only and "datumflow" in systems:
            from bench import spawn_limit

            files = max(int(1000 * args.scale), 50)
            spawns = []
            for run in range(max(args.repeat, 1)):
                spawns.append(spawn_limit.run(work / f"spawn-{run}", files=files, workers=2))
                for m in spawns[-1]:
                    keep(m)
            print(spawn_limit.table(spawns, files=files, workers=2))
        if "batching" in only and "datumflow" in systems:
            from bench import batching_loop

            looped: list[Measure] = []
            for run in range(max(args.repeat, 1)):
                got = batching_loop.run(
                    work=work / f"batching-{run}",
                    datums=max(int(batching_loop.DATUMS * args.scale), 8),
                )
                for m in got:
                    _say(f"{m.system:>18} {m.datums:>6,} in {m.seconds:7.2f} s = {m.rate:,.0f}/s")
                looped += got
            measures += looped
            print(batching_loop.table(looped))
        if args.json:
            args.json.write_bytes(msgspec.json.encode(measures))
    finally:
        if redis is not None:
            redis.stop()
        if args.keep:
            _say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
