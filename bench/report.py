"""The results as Markdown: one table of rates, one of the issue's targets."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable

from bench.scenarios import Measure, Scenario

SYSTEMS = [
    ("datumflow", "datumflow"),
    ("celery", "Celery on Redis"),
    ("pool", "multiprocessing.Pool"),
    ("nats-bare", "bare nats-py fetch+ack"),
]


def _find(measures: Iterable[Measure], system: str, scenario: str) -> Measure | None:
    """The system's measure of the scenario: with repeated runs, the median one by rate (a failed
    run counts as the slowest, so that a failure shows unless most runs passed)."""
    found = [m for m in measures if m.system == system and m.scenario == scenario]
    if not found:
        return None
    found.sort(key=lambda m: m.rate if m.ok else -1.0)
    return found[(len(found) - 1) // 2]


def _cell(m: Measure | None, scenario: Scenario | None) -> str:
    if m is None:
        return ""
    flag = "" if m.ok else " (FAILED: " + (m.note or "see logs") + ")"
    if scenario is not None and scenario.ideal:
        return (
            f"{m.rate:,.0f}/s, {m.seconds:.2f} s = {m.seconds / scenario.ideal:.2f} x ideal{flag}"
        )
    return f"{m.rate:,.0f}/s{flag}"


def machine() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "")
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs ({cpu or platform.machine()}), Python {platform.python_version()}"
    )


def tables(
    measures: list[Measure], scenarios: list[Scenario], versions: dict[str, str], repeat: int = 1
) -> str:
    lines = [f"Machine: {machine()}; " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    if repeat > 1:
        lines[-1:] = [f"Each figure is the median of {repeat} runs (planning: one run).", ""]
    lines.append("| scenario | " + " | ".join(title for _, title in SYSTEMS) + " |")
    lines.append("|---" * (len(SYSTEMS) + 1) + "|")
    for s in scenarios:
        row = f"{s.title}: {s.datums:,} datums, {s.workers} workers"
        cells = [_cell(_find(measures, system, s.key), s) for system, _ in SYSTEMS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    for m in measures:
        if m.scenario.startswith("plan-"):
            files = int(m.scenario.split("-", 1)[1])
            row = f"planning a {files:,}-file commit, glob /*"
            cell = f"{m.rate:,.0f} datums/s, {m.seconds:.1f} s, planner peak {m.peak_mb:.0f} MB"
            if not m.ok:
                cell += f" (FAILED: {m.note})"
            lines.append(f"| {row} | {cell} |" + " |" * (len(SYSTEMS) - 1))
    lines += ["", "| target | measured | |", "|---|---|---|"]
    for target, value, met in targets(measures, scenarios):
        lines.append(f"| {target} | {value} | {'met' if met else '**missed**'} |")
    runs = per_run(measures)
    if runs:
        lines += ["", "Each run's ratio, measured side by side (load average after the run):", ""]
        lines += [f"- {line}" for line in runs]
    return "\n".join(lines)


RATIOS = [
    ("datumflow", "pool", "cpu", "10 ms datums, datumflow / multiprocessing.Pool"),
    ("datumflow", "nats-bare", "noop", "no-op datums, datumflow / bare fetch+ack"),
]


def per_run(measures: list[Measure]) -> list[str]:
    """For each ratio of the targets, every run's value: the n-th measure of one system against
    the n-th of the other, taken one after the other in the same run."""
    out = []
    for a, b, scenario, title in RATIOS:
        xs = [m for m in measures if m.system == a and m.scenario == scenario]
        ys = [m for m in measures if m.system == b and m.scenario == scenario]
        cells = [
            f"{x.rate / y.rate:.2f} (load {max(x.extra.get('load_1min', 0), y.extra.get('load_1min', 0)):.1f})"
            for x, y in zip(xs, ys, strict=False)
            if x.ok and y.rate
        ]
        if cells:
            out.append(f"{title}: " + ", ".join(cells))
    return out


def targets(measures: list[Measure], scenarios: list[Scenario]) -> list[tuple[str, str, bool]]:
    out: list[tuple[str, str, bool]] = []
    by_key = {s.key: s for s in scenarios}

    def ratio(a: str, b: str, scenario: str) -> float | None:
        x, y = _find(measures, a, scenario), _find(measures, b, scenario)
        if x is None or y is None or not y.rate:
            return None
        return x.rate / y.rate

    r = ratio("datumflow", "celery", "noop")
    if r is not None:
        out.append(("no-op datums/s >= 2 x Celery on Redis", f"{r:.1f} x", r >= 2))
    r = ratio("datumflow", "nats-bare", "noop")
    if r is not None:
        out.append(("no-op datums/s >= 50 % of bare fetch+ack", f"{r:.0%}", r >= 0.5))
    r = ratio("datumflow", "pool", "cpu")
    if r is not None:
        out.append(("10 ms datums/s >= 92 % of multiprocessing.Pool", f"{r:.0%}", r >= 0.92))
    m = _find(measures, "datumflow", "sleep")
    if m is not None and "sleep" in by_key:
        x = m.seconds / by_key["sleep"].ideal
        out.append(("makespan <= 1.1 x ideal", f"{x:.2f} x ({m.seconds:.2f} s)", x <= 1.1))
    for m in measures:
        if m.scenario.startswith("plan-"):
            files = int(m.scenario.split("-", 1)[1])
            out.append(
                (
                    f"planning {files:,} files >= 20,000 datums/s",
                    f"{m.rate:,.0f}/s",
                    m.rate >= 20_000,
                )
            )
            if files >= 1_000_000:
                out.append(
                    ("1,000,000 datums planned in < 300 MB", f"{m.peak_mb:.0f} MB", m.peak_mb < 300)
                )
    return out
