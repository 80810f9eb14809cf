"""What metrics cost: the no-op scenario with metrics on (the default) and off
(DATUMFLOW_METRICS=off), run alternately, a fresh `datumflow up` each time, so that the machine's
load weighs on both alike.

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


def table(measures: dict[str, list[Measure]]) -> str:
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
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="datumflow-metrics-bench-"))
    try:
        print(table(run(work=work, repeat=args.repeat, scale=args.scale)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
