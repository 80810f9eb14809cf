"""Sum up the per-fault timings the long cluster form collects ($DATUMFLOW_FAULT_REPORT.faults) as
a Markdown table, kind by kind: the least and most of the election, the first datum done after the fault, the
longest wait between two datums done, and the time until the cluster was whole again.

    python -m tests.cluster.timings /tmp/cluster.jsonl.faults
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import msgspec

from tests.cluster.faults import Fault


class Timed(msgspec.Struct, kw_only=True):
    """One fault of the long form and what followed it (written by test_long_cluster_faults)."""

    fault: Fault
    scenario: str
    first_progress: float
    """Seconds from the fault to the next datum counted done (-1: none before the job ended)."""
    stall: float
    """The longest wait between two datums counted done, from the fault to its recovery."""
    recovered: float
    """Seconds from the fault until the cluster was whole again."""


def _span(values: list[float]) -> str:
    values = [v for v in values if v > 0]
    if not values:
        return "-"
    return f"{min(values):.1f} to {max(values):.1f}"


def summarize(lines: list[bytes]) -> str:
    kinds: dict[str, list[Timed]] = defaultdict(list)
    for line in lines:
        if line.strip():
            timed = msgspec.json.decode(line, type=Timed)
            kinds[timed.fault.kind].append(timed)
    rows = [
        "| fault | count | new leader after, s | next datum done after, s |"
        " longest wait between datums, s | whole again after, s |",
        "|---|---:|---|---|---|---|",
    ]
    for kind, runs in sorted(kinds.items()):
        rows.append(
            f"| {kind} | {len(runs)} | {_span([r.fault.election for r in runs])} |"
            f" {_span([r.first_progress for r in runs])} | {_span([r.stall for r in runs])} |"
            f" {_span([r.recovered for r in runs])} |"
        )
    rows.append(f"| **all** | {sum(len(r) for r in kinds.values())} | | | | |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1]).read_bytes().splitlines()))
