"""Sum up the per-fault timings the long cluster form collects ($DATUMFLOW_FAULT_REPORT.faults) as
a Markdown table, kind by kind: the least and most of the election, the first datum done after the
fault, the same for the faults after which a datum was done before the next fault was injected (the
failover gap of one fault alone: the long form injects the next one as soon as the cluster is whole
again, often before work has resumed, and then the first figure spans several faults), the longest
wait between two datums done, and the time until the cluster was whole again.

    python -m tests.cluster.timings /tmp/cluster.jsonl.faults [more.faults ...]

Files are read in the order given, each in the order written: that is the order of the faults.
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


def alone(faults: list[Timed]) -> list[bool]:
    """For each fault (in the order injected), whether a datum was done after it and before the
    next fault."""
    out = []
    for i, timed in enumerate(faults):
        later = faults[i + 1].fault.at if i + 1 < len(faults) else float("inf")
        out.append(0 <= timed.first_progress and timed.fault.at + timed.first_progress <= later)
    return out


def summarize(lines: list[bytes]) -> str:
    faults = [msgspec.json.decode(line, type=Timed) for line in lines if line.strip()]
    kinds: dict[str, list[tuple[Timed, bool]]] = defaultdict(list)
    for timed, single in zip(faults, alone(faults), strict=True):
        kinds[timed.fault.kind].append((timed, single))
    rows = [
        "| fault | count | new leader after, s | next datum done after, s |"
        " the same, done before the next fault: faults, s |"
        " longest wait between datums, s | whole again after, s |",
        "|---|---:|---|---|---|---|---|",
    ]
    for kind, runs in sorted(kinds.items()):
        timed = [t for t, _ in runs]
        single = [t.first_progress for t, ok in runs if ok]
        rows.append(
            f"| {kind} | {len(runs)} | {_span([t.fault.election for t in timed])} |"
            f" {_span([t.first_progress for t in timed])} |"
            f" {len(single)}: {_span(single)} | {_span([t.stall for t in timed])} |"
            f" {_span([t.recovered for t in timed])} |"
        )
    rows.append(f"| **all** | {len(faults)} | | | {sum(alone(faults))} | | |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(
        summarize([line for name in sys.argv[1:] for line in Path(name).read_bytes().splitlines()])
    )
