"""`datumflow demo`: a private datumflow, a two-stage DAG over sample files, the result, and stop.

Stage one maps each file to its word count (one datum per file, two workers); stage two reduces
all counts to one total. The user code is plain shell that hard-codes /pfs, as Pachyderm code does.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.live import Live
from rich.table import Table

from datumflow.broker.messages import FileRef
from datumflow.broker.records import JobInfo
from datumflow.cli.context import open_api
from datumflow.runtime.supervisor import Supervisor
from datumflow.settings import Settings
from datumflow.spec import load_spec

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a datum is the smallest unit of work a pipeline processes",
    "every new file in a repo is processed once by the code of the pipeline",
    "workers scale from zero to the parallelism limit and back to zero",
    "commits are events and pipelines chain into a graph",
]

# Pipeline specs as a user writes them (JSON documents), loaded with load_spec.
COUNT: dict[str, Any] = {
    "pipeline": {"name": "count"},
    "description": "Words per file: one datum per file.",
    "input": {"pfs": {"repo": "texts", "glob": "/*"}},
    "transform": {
        "cmd": [
            "sh",
            "-c",
            'for f in /pfs/texts/*; do wc -w < "$f" > "/pfs/out/$(basename "$f")"; done',
        ],
    },
    "parallelism_spec": {"constant": 2},
}

TOTAL: dict[str, Any] = {
    "pipeline": {"name": "total"},
    "description": "Sum of all word counts: one datum over the whole repo.",
    "input": {"pfs": {"repo": "count", "glob": "/"}},
    "transform": {
        "cmd": ["sh", "-c", "cat /pfs/count/* | awk '{s+=$1} END {print s}' > /pfs/out/total"]
    },
}


def _progress(jobs: list[JobInfo]) -> Table:
    table = Table(title="jobs", box=None, header_style="bold")
    for column in ("PIPELINE", "JOB", "PROGRESS", "STATE"):
        table.add_column(column)
    for j in sorted(jobs, key=lambda j: j.created):
        done = j.data_processed + j.data_skipped
        table.add_row(j.pipeline, j.id[:12], f"{done} / {j.data_total}", j.state)
    return table


async def run_demo(*, files: int = 20, console: Console, nats_server: str = "") -> str:
    """`nats_server`: the nats-server binary to run (the setting), else the packaged one."""
    with tempfile.TemporaryDirectory(prefix="datumflow-demo-") as home:
        # A private datumflow: nothing of the user's settings but the broker binary to run.
        # No web console either: the demo is over in seconds.
        settings = Settings(home=home, ack_wait=10, nats_server=nats_server, console_address="off")
        supervisor = Supervisor(settings=settings, embedded=True)
        stop = asyncio.Event()
        console.print(f"[bold]datumflow demo[/] in {home}: starting the broker and the functions")
        runner = asyncio.create_task(supervisor.run(stop))
        try:
            while not (Path(home) / "instance.json").exists():
                if runner.done():
                    await runner
                await asyncio.sleep(0.05)
            return await _drive(Settings(home=home), files=files, console=console)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await runner


async def _drive(settings: Settings, *, files: int, console: Console) -> str:
    started = time.monotonic()
    async with open_api(settings) as api:
        await api.repos.create_repo("texts", description="sample texts")
        refs = []
        for i in range(files):
            text = (TEXTS[i % len(TEXTS)] + "\n") * (i + 1)
            key, size = await api.store.put_bytes(text.encode())
            refs.append(FileRef(path=f"/text{i:02d}.txt", size=size, hash=key))
        commit = await api.repos.commit_files("texts", "master", puts=refs)
        console.print(f"put {files} files into texts@master ({commit.id[:12]})")
        for spec in (COUNT, TOTAL):
            await api.pipelines.create(
                load_spec(msgspec.json.encode(spec)), ack_wait=settings.ack_wait
            )
            console.print(f"created pipeline {spec['pipeline']['name']}: {spec['description']}")
        with Live(console=console, refresh_per_second=8, transient=False) as live:
            while True:
                jobs = await api.pipelines.list_jobs()
                live.update(_progress(jobs))
                total_job = next((j for j in jobs if j.pipeline == "total" and j.done), None)
                failed = [j for j in jobs if j.state in ("failure", "killed")]
                if failed:
                    raise RuntimeError(
                        f"job {failed[0].pipeline}@{failed[0].id} failed: {failed[0].reason}"
                    )
                if total_job is not None:
                    break
                if time.monotonic() - started > 120:
                    raise RuntimeError("the demo did not finish within 120s")
                await asyncio.sleep(0.2)
        console.print()
        head = await api.repos.head("total", "master")
        assert head is not None
        [result] = [f for f in await api.repos.files(head)]
        total = (await api.store.get_bytes(result.hash)).decode().strip()
    expected = sum(len(TEXTS[i % len(TEXTS)].split()) * (i + 1) for i in range(files))
    console.print(f"total@master:/total = [bold]{total}[/] words (expected {expected})")
    console.print(f"done in {time.monotonic() - started:.1f}s; stopping")
    if total != str(expected):
        raise RuntimeError(f"the demo computed {total} words, expected {expected}")
    return total
