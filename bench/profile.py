"""`python -m bench.profile`: where one datumflow scenario spends its CPU, to explain the figures.

python -m bench.profile noop                # CPU seconds per process, broker messages per datum
python -m bench.profile cpu --scale 0.5     # the same for half the 10 ms scenario
python -m bench.profile noop --spy          # and each function's hottest code (py-spy)
python -m bench.profile spawn --spy         # the command path: bench.spawn_limit's datumflow run
python -m bench.profile spawn --spy --idle  # wall time (waits included) rather than CPU
python -m bench.profile long --connz        # 200 ms sleeps: what costs CPU per second, not datum

One fresh `datumflow up`, one scenario as `python -m bench` runs it. Between the commit and the
job's end it reads every process's CPU time from /proc, the broker's message counts from its
monitoring endpoint, and with --spy samples the planner, the committer and the workers with
py-spy (installed into this environment when missing) and prints their top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import datumflow_runner, spawn_limit
from bench.cluster import Cluster
from bench.scenarios import Scenario, scenarios

TICKS = os.sysconf("SC_CLK_TCK")
SAMPLED = ("planner", "committer", "worker")
SPAWN = "spawn"
"""The command path's scenario (bench.spawn_limit): not one of bench.scenarios'."""
LONG = "long"
"""Datums that sleep 200 ms (bench.work.df_long), 2 workers: little happens per second, so what
costs CPU per wall second rather than per datum (timers, polling, heartbeats) stands out."""


def _long(scale: float) -> Scenario:
    return Scenario(
        key=LONG, title="200 ms sleep datums", kind=LONG, datums=max(int(100 * scale), 8), workers=2
    )


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def _processes(cluster: Cluster) -> dict[int, str]:
    """The cluster's processes: `up`, nats-server and the functions, by a short name."""
    found = {}
    for pid in cluster.pids():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        if "nats-server" in argv[0]:
            found[pid] = "nats-server"
        elif "datumflow.cli.main" in argv:
            # "up", "planner", "worker --pipeline noop", ...: the words after the module
            words = argv[argv.index("datumflow.cli.main") + 1 :]
            found[pid] = " ".join(w for w in words if w and w != "--home" and "/" not in w)
    return found


def _monitor(cluster: Cluster, path: str) -> dict:  # type: ignore[type-arg]
    from datumflow.runtime.embedded import read_instance

    instance = read_instance(cluster.home)
    assert instance is not None
    host = instance.monitor_url.split("://")[-1].rstrip("/")
    with urllib.request.urlopen(f"http://{host}/{path}", timeout=5) as reply:
        return json.load(reply)  # type: ignore[no-any-return]


def _broker_counts(cluster: Cluster) -> dict[str, int]:
    varz = _monitor(cluster, "varz")
    return {k: varz[k] for k in ("in_msgs", "out_msgs")}


Counts = dict[int, tuple[str, int, int]]


def _connections(cluster: Cluster) -> Counts:
    """Messages each client connection has sent the broker and received from it, by its id."""
    connz = _monitor(cluster, "connz?limit=1000")
    return {
        c["cid"]: (c.get("name", "") or "?", c["in_msgs"], c["out_msgs"])
        for c in connz["connections"]
    }


def connection_rates(
    before: Counts, after: Counts, seconds: float
) -> list[tuple[str, float, float]]:
    """Messages per second sent (to the broker) and received by each connection open throughout,
    busiest first; connections opened meanwhile count from 0."""
    rates = []
    for cid, (name, sent, received) in after.items():
        _, sent0, received0 = before.get(cid, (name, 0, 0))
        rates.append((f"{name} #{cid}", (sent - sent0) / seconds, (received - received0) / seconds))
    return sorted(rates, key=lambda r: -(r[1] + r[2]))


def _ensure_py_spy() -> str:
    binary = Path(sys.executable).with_name("py-spy")
    if not binary.exists():
        print("bench: installing py-spy ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return str(binary)


def top_functions(raw: Path, count: int = 12) -> list[tuple[float, str]]:
    """The functions a py-spy raw profile spent most samples in (self time), as shares."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        frame = stack.rsplit(";", 1)[-1]
        match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
        if match:
            name, where = match.groups()
            frame = f"{name} ({where.split('site-packages/')[-1].split('/')[-1]})"
        own[frame] += int(n)
        total += int(n)
    return [(n / total, frame) for frame, n in own.most_common(count)] if total else []


def _spy_on(binary: str, pid: int, raw: Path, *, idle: bool) -> subprocess.Popen[bytes]:
    argv = [binary, "record", "-p", str(pid), "-r", "250", "-f", "raw", "-o", str(raw)]
    argv += ["--idle"] if idle else []
    quiet = subprocess.DEVNULL
    return subprocess.Popen([*argv, "--nonblocking"], stdout=quiet, stderr=quiet)


class _Profile:
    """CPU per process, broker messages and py-spy samples between a commit and its job's end."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        title: str,
        datums: int,
        spy: str,
        idle: bool,
        out: Path,
        connz: bool = False,
    ) -> None:
        self.cluster, self.title, self.datums, self.spy, self.out = cluster, title, datums, spy, out
        self.idle, self.connz = idle, connz
        self.conns: Counts = {}
        self.started = 0.0
        self.before: dict[int, tuple[str, float]] = {}
        self.counts: dict[str, int] = {}
        self.spies: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

    async def start(self) -> None:
        processes = _processes(self.cluster)
        self.before.update({pid: (name, _cpu(pid)) for pid, name in processes.items()})
        self.counts.update(_broker_counts(self.cluster))
        if self.spy:
            for pid, (name, _) in self.before.items():
                if name.split(" ")[0] in SAMPLED:
                    raw = self.out / f"{name.replace(' ', '-')}-{pid}.txt"
                    self.spies.append((name, raw, _spy_on(self.spy, pid, raw, idle=self.idle)))
            await asyncio.sleep(1.0)  # py-spy attaches
            # the CPU from here on: py-spy's attaching is not the scenario's
            self.before.update({pid: (name, _cpu(pid)) for pid, name in processes.items()})
        if self.connz:
            self.conns = _connections(self.cluster)
        self.started = time.monotonic()

    async def finish(self, job) -> None:  # type: ignore[no-untyped-def]
        spent = {pid: (name, _cpu(pid) - cpu) for pid, (name, cpu) in self.before.items()}
        wall = time.monotonic() - self.started
        conns = _connections(self.cluster) if self.connz else {}
        children = _children_cpu(self.before)
        after = _broker_counts(self.cluster)
        total = sum(cpu for _, cpu in spent.values())
        n = self.datums
        print(f"\n{self.title}: {n:,} datums")
        print(f"job {job.finished - job.created:.2f} s; CPU between commit and job end:")
        for _, (name, cpu) in sorted(spent.items(), key=lambda kv: -kv[1][1]):
            per_second = f"{cpu / wall * 1e3:6.1f} ms/s"
            print(f"  {cpu:7.2f} s  {cpu / n * 1e6:8.0f} us/datum  {per_second}  {name}")
        for name, cpu in children.items():
            print(f"  {cpu:7.2f} s  {cpu / n * 1e6:8.0f} us/datum  {name}: its reaped children")
        print(f"  {total:7.2f} s  {total / n * 1e6:8.0f} us/datum  in all (children apart)")
        for k, v in after.items():
            print(f"broker {k}: {(v - self.counts[k]) / n:.2f} per datum")
        if conns:
            print(f"messages per second over {wall:.1f} s, by connection: to the broker, from it")
            for name, sent, received in connection_rates(self.conns, conns, wall):
                print(f"  {sent:8.1f} {received:8.1f}  {name}")
        for _, _, process in self.spies:
            process.send_signal(2)  # SIGINT: py-spy writes its profile and exits
        for name, raw, process in self.spies:
            await asyncio.to_thread(process.wait, 60)
            if raw.exists():
                print(f"\n{name}: where its samples were (own time)")
                for share, frame in top_functions(raw, 20):
                    print(f"  {share:6.1%}  {frame}")


_CHILDREN: dict[int, float] = {}


def _children_cpu(before: dict[int, tuple[str, float]]) -> dict[str, float]:
    """The CPU of each worker's reaped children (the user code) since `start`."""
    spent = {}
    for pid, (name, _) in before.items():
        if name.startswith("worker"):
            spent[f"{name} {pid}"] = _reaped(pid) - _CHILDREN.get(pid, 0.0)
    return spent


def _reaped(pid: int) -> float:
    """cutime + cstime of a process: the CPU of the children it waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / TICKS


async def _profile(
    cluster: Cluster, key: str, scale: float, spy: str, idle: bool, out: Path, connz: bool
) -> None:
    if key == SPAWN:
        files = max(1, int(1000 * scale))
        title = f"a process per datum ({SPAWN}): {files:,} one-line files, 2 workers"
        profile = _Profile(cluster, title=title, datums=files, spy=spy, idle=idle, out=out)

        async def before_commit() -> None:
            await profile.start()
            for pid, (name, _) in profile.before.items():
                if name.startswith("worker"):
                    _CHILDREN[pid] = _reaped(pid)

        wait_job = spawn_limit.wait_job

        async def measured(api, pipeline: str, **kw):  # type: ignore[no-untyped-def]
            job = await wait_job(api, pipeline, **kw)
            await profile.finish(job)
            return job

        spawn_limit.wait_job = measured
        try:
            await spawn_limit.datumflow(
                cluster, files=files, workers=2, sets=0, before_commit=before_commit
            )
        finally:
            spawn_limit.wait_job = wait_job
        return
    [scenario] = [s for s in [*scenarios(scale), _long(scale)] if s.key == key]
    title = f"{scenario.title}: {scenario.workers} workers"
    profile = _Profile(
        cluster, title=title, datums=scenario.datums, spy=spy, idle=idle, out=out, connz=connz
    )
    commit, wait_job = datumflow_runner._commit, datumflow_runner.wait_job

    async def measured_commit(c: Cluster, repo: str, files: int) -> float:
        await profile.start()
        return await commit(c, repo, files)

    async def measured_wait(api, pipeline: str, **kw):  # type: ignore[no-untyped-def]
        job = await wait_job(api, pipeline, **kw)
        await profile.finish(job)
        return job

    datumflow_runner._commit, datumflow_runner.wait_job = measured_commit, measured_wait
    try:
        await datumflow_runner.run_scenario(cluster, scenario)
    finally:
        datumflow_runner._commit, datumflow_runner.wait_job = commit, wait_job


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__.splitlines()[0]
    )
    parser.add_argument("scenario", choices=[*(s.key for s in scenarios()), SPAWN, LONG])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the datum count")
    parser.add_argument("--spy", action="store_true", help="sample the functions with py-spy")
    parser.add_argument(
        "--idle", action="store_true", help="with --spy: wall time, waits included (py-spy --idle)"
    )
    parser.add_argument(
        "--connz",
        action="store_true",
        help="messages per second each client connection exchanged with the broker",
    )
    parser.add_argument(
        "--user-code-user", default="", help="run user code as this user (as root): nobody, ..."
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="datumflow-profile-"))
    extra = {"DATUMFLOW_USER_CODE_USER": args.user_code_user} if args.user_code_user else {}
    cluster = Cluster(work / "datumflow", **extra)
    cluster.start()
    try:
        spy = _ensure_py_spy() if args.spy else ""
        asyncio.run(_profile(cluster, args.scenario, args.scale, spy, args.idle, work, args.connz))
    finally:
        cluster.stop()
    print(f"\nbench: profiles and logs in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
