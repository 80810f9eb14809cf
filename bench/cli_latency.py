"""How long the `datumflow` command takes before it has done anything: `datumflow --help`, and
`datumflow list repo` against a running `datumflow up` (an empty one: the time is start-up, one
connection and one listing).

Each is run once to warm up (bytecode written, files in the page cache, as on a machine where
the command has been used before), then N times; the best wall time is the figure, compared with
the target, and the median and the load average are shown beside it.

python -m bench --only cli
python -m bench.cli_latency --repeat 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

TARGET_SECONDS = 0.25


class Latency(msgspec.Struct, kw_only=True):
    command: str
    best: float
    median: float
    runs: int
    load_1min: float
    target: float = TARGET_SECONDS

    @property
    def ok(self) -> bool:
        return self.best < self.target


def datumflow_argv() -> list[str]:
    """The installed `datumflow` script beside this Python, as a user runs it."""
    script = Path(sys.executable).parent / "datumflow"
    return [str(script)] if script.exists() else [sys.executable, "-m", "datumflow.cli.main"]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
    # A user's installation keeps compiled bytecode; without it every run compiles again.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["DATUMFLOW_HOME"] = str(home)
    return env


def time_command(args: list[str], *, home: Path, repeat: int) -> Latency:
    argv = [*datumflow_argv(), *args]
    env = _env(home)
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=120)  # warm-up
    walls = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, capture_output=True, timeout=120)
        walls.append(time.perf_counter() - start)
    return Latency(
        command="datumflow " + " ".join(args),
        best=min(walls),
        median=statistics.median(walls),
        runs=repeat,
        load_1min=os.getloadavg()[0],
    )


def run(*, work: Path, repeat: int = 5) -> list[Latency]:
    """Time `--help` (no instance needed), then start `datumflow up` and time `list repo`."""
    from bench.cluster import Cluster

    home = work / "cli-latency"
    results = [time_command(["--help"], home=home, repeat=repeat)]
    cluster = Cluster(home)
    cluster.start()
    try:
        results.append(time_command(["list", "repo"], home=home, repeat=repeat))
    finally:
        cluster.stop()
    return results


def table(results: list[Latency]) -> str:
    lines = [
        f"CLI latency (best of {results[0].runs} after a warm-up; target {TARGET_SECONDS:.2f} s)",
        f"{'command':<22} {'best':>8} {'median':>8} {'load':>6}  verdict",
    ]
    for r in results:
        verdict = "ok" if r.ok else f"over the {r.target:.2f} s target"
        lines.append(
            f"{r.command:<22} {r.best:>7.3f}s {r.median:>7.3f}s {r.load_1min:>6.2f}  {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cli_latency", description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="datumflow-cli-latency-"))
    try:
        print(table(run(work=work, repeat=args.repeat)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
