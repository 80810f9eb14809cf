"""Datum batching from a shell against the in-process function path, in one `datumflow up`.

The same no-op datums go through two pipelines one after the other: an in-process function
(`transform.function = "bench.work:df_noop"`, the path of the other scenarios), and a
`datum_batching` command that is a `sh` loop calling `datumflow-next-datum` for each datum (the
`#!/bin/sh` client the worker puts first on the code's PATH: a line each way through a pair of
named pipes, no Python interpreter started). The figure is each one's datums/s and their ratio,
measured side by side.

python -m bench --only batching
python -m bench.batching_loop --datums 400
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from pathlib import Path

from bench import datumflow_runner
from bench.cluster import Cluster, wait_job, wait_workers
from bench.scenarios import Measure, Scenario

DATUMS = 400
WORKERS = 2


def loop_command() -> list[str]:
    """The user code: a shell loop asking for the next datum until there is none."""
    return ["sh", "-c", 'while vars=$(datumflow-next-datum); do eval "$vars"; done']


async def _run_loop(cluster: Cluster, datums: int) -> Measure:
    name, repo = "batching", "looped"  # a shell variable name: the loop exports it
    await datumflow_runner._create_repo(cluster, repo)
    cluster.create_pipeline(
        {
            "pipeline": {"name": name},
            "input": {"pfs": {"repo": repo, "glob": "/*"}},
            "transform": {"cmd": loop_command(), "datum_batching": True},
            "parallelism_spec": {"constant": WORKERS},
        }
    )
    async with cluster.api() as api:
        await wait_workers(api, name, WORKERS)
    started = await datumflow_runner._commit(cluster, repo, datums)
    async with cluster.api() as api:
        job = await wait_job(api, name)
    ok = job.state == "success" and job.data_processed == datums
    cluster.cli("delete", "pipeline", name)
    return Measure(
        system="datumflow-sh-loop",
        scenario="batching",
        datums=datums,
        seconds=job.finished - started,
        ok=ok,
        note="" if ok else f"job {job.state}: {job.data_processed}/{job.data_total} {job.reason}",
    )


async def _both(cluster: Cluster, datums: int) -> list[Measure]:
    inprocess = Scenario(
        key="batchfn", title="no-op datums", kind="noop", datums=datums, workers=WORKERS
    )
    function = await datumflow_runner.run_scenario(cluster, inprocess)
    function.scenario, function.system = "batching", "datumflow-function"
    return [function, await _run_loop(cluster, datums)]


def run(*, work: Path, datums: int = DATUMS) -> list[Measure]:
    """Both pipelines in one fresh `datumflow up`; the in-process one first."""
    cluster = Cluster(work / "datumflow-batching")
    cluster.start()
    try:
        measures = asyncio.run(_both(cluster, datums))
    finally:
        cluster.stop()
    for m in measures:
        m.extra["load_1min"] = os.getloadavg()[0]
    return measures


def table(measures: list[Measure]) -> str:
    """One row per run: the two rates and their ratio, with the load after the run."""
    functions = [m for m in measures if m.system == "datumflow-function"]
    loops = [m for m in measures if m.system == "datumflow-sh-loop"]
    lines = [
        "| datum_batching `sh` loop vs in-process function | sh loop | function | ratio | load |",
        "|---|---|---|---|---|",
    ]
    for fn, loop in zip(functions, loops, strict=False):
        flag = "" if fn.ok and loop.ok else f" (FAILED: {fn.note or loop.note})"
        ratio = loop.rate / fn.rate if fn.rate else 0.0
        lines.append(
            f"| {loop.datums:,} no-op datums, {WORKERS} workers | {loop.rate:,.0f} datums/s"
            f" | {fn.rate:,.0f} datums/s | {ratio:.3f} x{flag}"
            f" | {loop.extra.get('load_1min', 0):.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.batching_loop", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--datums", type=int, default=DATUMS)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="datumflow-batching-"))
    try:
        measures: list[Measure] = []
        for _ in range(args.repeat):
            measures += run(work=work / str(len(measures)), datums=args.datums)
        print(table(measures))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
