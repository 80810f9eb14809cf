"""What an idle `datumflow up` costs: CPU of each of its processes while nothing happens.

A fresh `datumflow up` with one repo and one autoscaled pipeline (no worker runs: no lag), left to
settle, then measured over two windows back to back. Each process's CPU comes from /proc (user and
system ticks), as a percentage of one core. The second window against the first says whether the
cost stays flat: something that grows while idle (a listing that leaves consumers behind, a
document read every second that grows with them) shows as a second window above the first.

python -m bench --only idle
python -m bench.idle_cpu --window 30
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import msgspec

from bench.cluster import Cluster

TICKS = os.sysconf("SC_CLK_TCK")


class IdleCpu(msgspec.Struct, kw_only=True):
    window: float
    """Seconds of each window."""
    first: dict[str, float]
    """Percent of a core by process kind, first window."""
    second: dict[str, float]
    load_1min: float


def _kind(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [a.decode(errors="replace") for a in argv if a]
    if any(w.endswith("nats-server") for w in words):
        return "nats-server"
    for kind in ("up", "planner", "committer", "ingest", "console", "worker"):
        if kind in words:
            return kind
    return words[-1] if words else str(pid)


def _ticks(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = int(fields[11]) + int(fields[12])  # utime + stime
    return out


def _window(cluster: Cluster, seconds: float) -> dict[str, float]:
    pids = cluster.pids()
    kinds = {pid: _kind(pid) for pid in pids}
    before, start = _ticks(pids), time.monotonic()
    time.sleep(seconds)  # the measure itself: a fixed window of nothing happening
    after, elapsed = _ticks(pids), time.monotonic() - start
    percent: dict[str, float] = {}
    for pid, ticks in after.items():
        if pid in before:
            used = (ticks - before[pid]) / TICKS
            percent[kinds[pid]] = percent.get(kinds[pid], 0.0) + 100 * used / elapsed
    return dict(sorted(percent.items()))


def run(*, work: Path, window: float = 30.0, settle: float = 10.0) -> IdleCpu:
    cluster = Cluster(work / "idle")
    cluster.start()
    try:

        async def setup() -> None:
            async with cluster.api() as api:
                await api.repos.create_repo("idle")

        asyncio.run(setup())
        cluster.create_pipeline(
            {
                "pipeline": {"name": "idle-copy"},
                "input": {"pfs": {"repo": "idle", "glob": "/*"}},
                "transform": {"function": "bench.work:df_noop"},
                "autoscaling": True,
            }
        )
        time.sleep(settle)  # let start-up work (declarations, first listings) pass
        first = _window(cluster, window)
        second = _window(cluster, window)
        return IdleCpu(window=window, first=first, second=second, load_1min=os.getloadavg()[0])
    finally:
        cluster.stop()


def table(idle: IdleCpu) -> str:
    lines = [
        f"Idle datumflow up, one autoscaled pipeline: % of a core over two {idle.window:.0f} s"
        f" windows (load {idle.load_1min:.2f})",
        f"{'process':<14} {'first':>7} {'second':>7}",
    ]
    for kind in sorted(set(idle.first) | set(idle.second)):
        lines.append(
            f"{kind:<14} {idle.first.get(kind, 0.0):>6.2f}% {idle.second.get(kind, 0.0):>6.2f}%"
        )
    lines.append(
        f"{'all':<14} {sum(idle.first.values()):>6.2f}% {sum(idle.second.values()):>6.2f}%"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_cpu", description=__doc__)
    parser.add_argument("--window", type=float, default=30.0)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="datumflow-idle-"))
    try:
        print(table(run(work=work, window=args.window)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
