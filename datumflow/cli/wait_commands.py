"""The long waits: `wait job` and `wait commit`, with a live progress bar on a terminal
(`cli/progress.py`) and their result as JSON with --json."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import typer

from datumflow.broker.records import JobInfo, PipelineInfo
from datumflow.cli.context import Api, address_of, emit_json, fail, run, settings_of, with_api
from datumflow.cli.progress import Bars, show_job, wanted
from datumflow.errors import DatumflowError
from datumflow.pfs.paths import parse_job
from datumflow.spec import input_leaves


async def _wait_job(
    api: Api, pipeline: str, job: str, timeout: float, report: Callable[[JobInfo], None]
) -> JobInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = await api.pipelines.get_job(pipeline, job)
        report(info)
        if info.done:
            return info
        if time.monotonic() > deadline:
            raise DatumflowError(f"job {pipeline}@{job} is still {info.state} after {timeout:.0f}s")
        await asyncio.sleep(0.1)


def wait_job(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="PIPELINE@JOB"),
    timeout: float = typer.Option(3600, "--timeout"),
    as_json: bool = typer.Option(False, "--json", help="Print the finished job as JSON."),
) -> None:
    """Wait until a job is done; exit 1 unless it succeeded."""
    try:
        pipeline, job = parse_job(target)
    except DatumflowError as exc:
        fail(str(exc))

    async def body(api: Api) -> JobInfo:
        with Bars(show=wanted(as_json=as_json)) as bars:
            return await _wait_job(api, pipeline, job, timeout, lambda j: show_job(bars, j))

    info = run(with_api(settings_of(ctx), body))
    if as_json:
        emit_json(info)
    else:
        typer.echo(f"{pipeline}@{job}: {info.state}" + (f": {info.reason}" if info.reason else ""))
    if info.state != "success":
        raise typer.Exit(1)


def reads(info: PipelineInfo, repo: str, branch: str) -> bool:
    """Whether the pipeline takes commits of repo@branch as input (a commit on another branch of
    the repo starts none of its jobs)."""
    return any(x.repo == repo and x.branch == branch for x in input_leaves(info.spec.input))


async def wait_downstream(
    api: Api,
    repo: str,
    branch: str,
    commit: str,
    *,
    timeout: float,
    report: Callable[[JobInfo], None] = lambda job: None,
) -> list[JobInfo]:
    """Wait for every job that `repo@commit` (on `branch`) feeds, and then for the jobs their
    outputs feed; `report` sees each job every time it is read."""
    deadline = time.monotonic() + timeout
    finished: list[JobInfo] = []
    frontier = [(repo, branch, commit)]
    while frontier:
        repo, branch, commit = frontier.pop()
        for info in await api.pipelines.list():
            if not reads(info, repo, branch):
                continue
            while True:
                job = next(
                    (
                        j
                        for j in await api.pipelines.list_jobs(info.name)
                        if any(c.repo == repo and c.commit == commit for c in j.input_commits)
                    ),
                    None,
                )
                if job is not None:
                    report(job)
                    if job.done:
                        break
                if time.monotonic() > deadline:
                    raise DatumflowError(
                        f"pipeline {info.name} has not finished {repo}@{commit} after {timeout:.0f}s"
                    )
                await asyncio.sleep(0.1)
            finished.append(job)
            if job.state == "success" and job.output_commit:
                frontier.append((info.name, info.spec.output_branch, job.output_commit))
    return finished


def wait_commit(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="REPO@BRANCH"),
    timeout: float = typer.Option(3600, "--timeout"),
    as_json: bool = typer.Option(False, "--json", help="Print the finished jobs as JSON."),
) -> None:
    """Wait until a branch head and every job downstream of it are done; exit 1 if one failed."""
    address = address_of(target)

    async def body(api: Api) -> list[JobInfo]:
        head = await api.repos.inspect_commit(address.repo, address.ref)
        expected = len(downstream(head.repo, head.branch, await api.pipelines.list()))
        seen: dict[str, JobInfo] = {}

        def report(job: JobInfo) -> None:
            seen[job.id] = job
            done = sum(1 for j in seen.values() if j.done)
            counts = f"{done}/{expected} jobs"
            bars.set("", label="downstream", done=done, total=expected, counts=counts)
            show_job(bars, job)

        with Bars(show=wanted(as_json=as_json) and expected > 0) as bars:
            return await wait_downstream(
                api, head.repo, head.branch, head.id, timeout=timeout, report=report
            )

    jobs = run(with_api(settings_of(ctx), body))
    if as_json:
        emit_json(jobs)
    failed = [j for j in jobs if j.state != "success"]
    for j in jobs:
        typer.echo(
            f"{j.pipeline}@{j.id}: {j.state}" + (f": {j.reason}" if j.reason else ""), err=True
        )
    if failed:
        raise typer.Exit(1)


def downstream(repo: str, branch: str, pipelines: list[PipelineInfo]) -> set[str]:
    """The pipelines that `repo@branch` feeds, and the ones their outputs feed, and so on."""
    found: set[str] = set()
    frontier = [(repo, branch)]
    while frontier:
        current, on = frontier.pop()
        for info in pipelines:
            if info.name not in found and reads(info, current, on):
                found.add(info.name)
                frontier.append((info.name, info.spec.output_branch))
    return found
