"""What metrics cost: the no-op scenario with metrics on (the default) and off
(DATUMFLOW_METRICS=off), run alternately, a fresh `datumflow up` each time, so that the machine's
load weighs on both alike; and the CPU the committer spends counting a job's datums when it ends
(multiprocess files, as under `up`), which a busy machine blurs less than a rate.

python -m bench --only metrics --repeat 5
python -m bench.metrics_cost --repeat 5 --scale 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from bench import datumflow_runner
from bench.cluster import Cluster
from bench.scenarios import Measure, scenarios

SETTINGS = {"on": {}, "off": {"DATUMFLOW_METRICS": "off"}}


def run(*, work: Path, repeat: int = 3, scale: float = 1.0) -> dict[str, list[Measure]]:
    """The no-op scenario `repeat` times with metrics on and with them off, alternating."""
    [noop] = [s for s in scenarios(scale) if s.key == "noop"]
    out: dict[str, list[Measure]] = {"on": [], "off": []}
    for run_index in range(max(repeat, 1)):
        # Alternate which goes first, so neither always follows the other's teardown.
        order = ("on", "off") if run_index % 2 == 0 else ("off", "on")
        for mode in order:
            cluster = Cluster(work / f"metrics-{mode}-{run_index}", **SETTINGS[mode])
            cluster.start()
            try:
                measure = asyncio.run(datumflow_runner.run_scenario(cluster, noop))
            finally:
                cluster.stop()
            measure.extra["load_1min"] = os.getloadavg()[0]
            out[mode].append(measure)
            print(
                f"bench: metrics {mode:>3}: {measure.datums:,} no-op datums in"
                f" {measure.seconds:.2f} s = {measure.rate:,.0f}/s"
                f" (load {measure.extra['load_1min']:.1f}){'' if measure.ok else ' FAILED'}",
                flush=True,
            )
    return out


def committer_cost(*, work: Path, datums: int = 10_000, rounds: int = 5) -> list[float]:
    """CPU microseconds per datum of counting a job of `datums` results at its end, per round."""
    import time

    from datumflow import metrics
    from datumflow.broker.messages import DatumResult, DatumStats, JobPlanned
    from datumflow.broker.records import JobInfo
    from datumflow.functions.job_metrics import job_ended
    from datumflow.functions.tally import Tally
    from datumflow.settings import Settings

    directory = work / "metrics-files"
    directory.mkdir(parents=True, exist_ok=True)
    metrics.install(Settings(metrics_dir=str(directory)))
    record = JobInfo(pipeline="noop", id="j", version=1, seq=1, created=1.0, finished=2.0)
    out = []
    for _ in range(rounds):
        tally = Tally()
        tally.add(JobPlanned(pipeline="noop", job="j", data_total=datums))
        for i in range(datums):
            stats = DatumStats(process_time=1e-5 * (i % 100), upload_bytes=1)
            tally.add(
                DatumResult(pipeline="noop", job="j", datum=f"{i}", state="success", stats=stats)
            )
        started = time.process_time()
        job_ended(pipeline="noop", tally=tally, state="success", record=record)
        out.append(1e6 * (time.process_time() - started) / datums)
    metrics.install(Settings(metrics="off"))
    return out


def table(measures: dict[str, list[Measure]], committer: list[float] | None = None) -> str:
    lines = [
        "| no-op datums/s, 2 workers | runs | min | median | max | load (1 min) |",
        "|---|---|---|---|---|---|",
    ]
    for mode, label in (("on", "metrics on (default)"), ("off", "DATUMFLOW_METRICS=off")):
        rates = [m.rate for m in measures[mode] if m.ok]
        loads = [m.extra["load_1min"] for m in measures[mode]]
        if not rates:
            lines.append(f"| {label} | 0 | | | | |")
            continue
        lines.append(
            f"| {label} | {len(rates)} | {min(rates):,.0f} | {statistics.median(rates):,.0f}"
            f" | {max(rates):,.0f} | {min(loads):.1f}-{max(loads):.1f} |"
        )
    on = [m.rate for m in measures["on"] if m.ok]
    off = [m.rate for m in measures["off"] if m.ok]
    if on and off:
        ratio = statistics.median(on) / statistics.median(off)
        lines.append(f"\nmedian with metrics / median without: {ratio:.1%}")
    if committer:
        lines.append(
            f"committer, counting a 10,000-datum job at its end: {min(committer):.2f}-"
            f"{max(committer):.2f} us CPU per datum ({len(committer)} rounds)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="datumflow-metrics-bench-"))
    try:
        measures = run(work=work, repeat=args.repeat, scale=args.scale)
        print(table(measures, committer_cost(work=work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
