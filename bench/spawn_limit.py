"""The command path against the spawn limit: a process per datum through datumflow, beside
`xargs -P N` starting the same shell and `cat` per file, with and without a mount namespace each.

One run measures, one after another on the same files with the same N:
- datumflow: a repo of FILES one-line files, glob `/*`, `transform.cmd` a shell that copies its
  file to /pfs/out; the job's own span (its `started` to its `finished`). Twice: a command's
  default sets of one datum, and sets of SETS, in which the next datum is downloaded and the last
  one stored while one runs.
- xargs: `xargs -P N -I{} sh -c 'cat in/{} > out/{}'`, from its start to its end.
- xargs + unshare: the same, each command under `unshare -m` (a fresh mount namespace each), as
  datumflow gives each datum's process a /pfs of its own.

The ratios datumflow/xargs are what the table shows: both sides in one run, so that the load of
the machine weighs on both alike.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.cluster import Cluster, wait_job, wait_workers
from bench.scenarios import Measure
from datumflow.broker.messages import FileRef

REPO = "files"
PIPELINE = "spawn"
SCENARIO = "spawn"
SCRIPT = 'cat /pfs/files/* > /pfs/out/"${files##*/}"'
"""The user code: `$files` is the datum's file under /pfs (the input's variable)."""
SETS = 16
"""Datums a worker takes at once in the second datumflow measure (`datum_set_spec.number`): its
datums are then overlapped (functions.worker.overlap)."""


def _names(files: int) -> list[str]:
    return [f"f{i:07d}" for i in range(files)]


async def datumflow(
    cluster: Cluster,
    *,
    files: int,
    workers: int,
    sets: int,
    before_commit: Callable[[], Awaitable[None]] | None = None,
) -> Measure:
    """The datumflow measure; `before_commit` (bench.profile's) runs once the files are stored,
    just before they are committed."""
    async with cluster.api() as api:
        await api.repos.create_repo(REPO)
    spec: dict[str, object] = {
        "pipeline": {"name": PIPELINE},
        "input": {"pfs": {"repo": REPO, "glob": "/*"}},
        "transform": {"cmd": ["sh", "-c", SCRIPT]},
        "parallelism_spec": {"constant": workers},
    }
    if sets:
        spec["datum_set_spec"] = {"number": sets}
    cluster.create_pipeline(spec)
    async with cluster.api() as api:
        await wait_workers(api, PIPELINE, workers)
        refs = []
        for name in _names(files):
            key, size = await api.store.put_bytes(f"{name}\n".encode())
            refs.append(FileRef(path=f"/{name}", size=size, hash=key))
        if before_commit is not None:
            await before_commit()
        await api.repos.commit_files(REPO, "master", puts=refs)
        job = await wait_job(api, PIPELINE)
    ok = job.state == "success" and job.data_processed == files
    return Measure(
        system=f"datumflow-sets-{sets}" if sets else "datumflow",
        scenario=SCENARIO,
        datums=files,
        seconds=job.finished - job.started,
        ok=ok,
        note="" if ok else f"job {job.state}: {job.data_processed}/{job.data_total} {job.reason}",
    )


def _xargs(work: Path, *, files: int, workers: int, unshare: bool) -> Measure:
    """`xargs -P workers` running a shell and `cat` per file; its wall time."""
    inputs, out = work / "in", work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    names = "\n".join(_names(files)) + "\n"
    prefix = ["unshare", "-m"] if unshare else []
    cmd = ["xargs", "-P", str(workers), "-I{}", *prefix, "sh", "-c", "cat in/{} > out/{}"]
    started = time.perf_counter()
    done = subprocess.run(cmd, input=names.encode(), cwd=work, capture_output=True)
    seconds = time.perf_counter() - started
    written = sum(1 for _ in out.iterdir())
    ok = done.returncode == 0 and written == files and inputs.is_dir()
    return Measure(
        system="xargs-unshare" if unshare else "xargs",
        scenario=SCENARIO,
        datums=files,
        seconds=seconds,
        ok=ok,
        note="" if ok else f"exit {done.returncode}, {written} outputs: {done.stderr[-300:]!r}",
    )


def run(work: Path, *, files: int = 1000, workers: int = 2) -> list[Measure]:
    """One run on the same files: datumflow (sets of one datum, the default for a command), then
    datumflow with sets of SETS (overlapped), then xargs with a namespace each, then plain xargs."""
    spawn = work / "spawn"
    (spawn / "in").mkdir(parents=True, exist_ok=True)
    for name in _names(files):
        (spawn / "in" / name).write_text(f"{name}\n")
    measures = []
    for sets in (0, SETS):
        cluster = Cluster(work / f"spawn-datumflow-{sets}")
        cluster.start()
        try:
            measures.append(
                asyncio.run(datumflow(cluster, files=files, workers=workers, sets=sets))
            )
        finally:
            cluster.stop()
            shutil.rmtree(work / f"spawn-datumflow-{sets}", ignore_errors=True)
    for unshare in (True, False):
        measures.append(_xargs(spawn, files=files, workers=workers, unshare=unshare))
    for m in measures:
        m.extra["load_1min"] = os.getloadavg()[0]
    for m in measures[2:]:
        m.extra["ratio"] = measures[0].rate / m.rate if m.rate else 0.0
        m.extra["sets_ratio"] = measures[1].rate / m.rate if m.rate else 0.0
    return measures


def table(runs: list[list[Measure]], *, files: int, workers: int) -> str:
    """The runs as Markdown: each run's rates and ratios, then the lowest and highest ratios."""
    lines = [
        f"Command per datum (`sh -c 'cat ... > ...'`), {files:,} one-line files, N = {workers}:",
        "",
        f"| run | load | datumflow | datumflow, sets of {SETS} | xargs -P N + unshare -m"
        " | xargs -P N | datumflow / xargs+unshare | the same, sets"
        " | datumflow / xargs | the same, sets |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios: dict[str, list[float]] = {"ns": [], "ns_sets": [], "bare": [], "bare_sets": []}
    for number, (ours, sets, ns, plain) in enumerate(runs, 1):
        ratios["ns"].append(ns.extra["ratio"])
        ratios["ns_sets"].append(ns.extra["sets_ratio"])
        ratios["bare"].append(plain.extra["ratio"])
        ratios["bare_sets"].append(plain.extra["sets_ratio"])
        flag = "" if all(m.ok for m in (ours, sets, ns, plain)) else " (FAILED)"
        lines.append(
            f"| {number}{flag} | {ours.extra.get('load_1min', 0):.1f} | {ours.rate:,.0f}/s"
            f" | {sets.rate:,.0f}/s | {ns.rate:,.0f}/s | {plain.rate:,.0f}/s"
            f" | {ns.extra['ratio']:.0%} | {ns.extra['sets_ratio']:.0%}"
            f" | {plain.extra['ratio']:.0%} | {plain.extra['sets_ratio']:.0%} |"
        )

    def span(key: str) -> str:
        return f"{min(ratios[key]):.0%}-{max(ratios[key]):.0%}"

    lines += [
        "",
        f"datumflow / (xargs + unshare -m): {span('ns')} (sets of {SETS}: {span('ns_sets')});"
        f" datumflow / xargs: {span('bare')} (sets of {SETS}: {span('bare_sets')});"
        " target: >= 80 % of xargs + unshare -m",
    ]
    return "\n".join(lines)
