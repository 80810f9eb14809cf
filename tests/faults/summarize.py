"""Sum up a fault report (the JSON lines DATUMFLOW_FAULT_REPORT collects) as a Markdown table.

python -m tests.faults.summarize /tmp/faults.jsonl [more.jsonl ...]

The datums/s of a job are its datums over its span from the commit to its end: the jobs of one
scenario against those of a fault-free one show what the faults cost in throughput.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path

import msgspec

from tests.faults.harness import Figures


def summarize(lines: list[bytes]) -> str:
    rounds: dict[str, list[Figures]] = defaultdict(list)
    for line in lines:
        if line.strip():
            figures = msgspec.json.decode(line, type=Figures)
            rounds[figures.scenario].append(figures)
    rows = [
        "| scenario | jobs | datums | faults injected | jobs SUCCESS, exact | re-run datums |"
        " lost | counted twice | datums/s, job by job |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    total_faults: Counter[str] = Counter()
    totals = Counter()
    for scenario, runs in rounds.items():
        faults: Counter[str] = Counter()
        for r in runs:
            faults.update(r.faults)
        total_faults.update(faults)
        datums = sum(r.datums for r in runs)
        reruns = sum(r.rerun_datums for r in runs)
        lost = sum(r.lost for r in runs)
        twice = sum(r.duplicated for r in runs)
        totals.update(jobs=len(runs), datums=datums, reruns=reruns, lost=lost, twice=twice)
        shown = ", ".join(f"{n} {k}" for k, n in sorted(faults.items())) or "none"
        rates = [r.datums / r.seconds for r in runs if r.seconds > 0]
        rate = f"{min(rates):.1f} to {max(rates):.1f}" if rates else "-"
        rows.append(
            f"| {scenario} | {len(runs)} | {datums} | {shown} | {len(runs)} | {reruns} | {lost} |"
            f" {twice} | {rate} |"
        )
    rows.append(
        f"| **all** | {totals['jobs']} | {totals['datums']} | {sum(total_faults.values())} |"
        f" {totals['jobs']} | {totals['reruns']} | {totals['lost']} | {totals['twice']} | |"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    print(
        summarize([line for name in sys.argv[1:] for line in Path(name).read_bytes().splitlines()])
    )
