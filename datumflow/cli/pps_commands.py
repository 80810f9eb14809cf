"""Pipelines and jobs: `create pipeline`, `list pipeline`, `list job`, `inspect job`, ..."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import typer

from datumflow.broker.records import JobInfo, PipelineInfo
from datumflow.cli.context import (
    Api,
    ago,
    duration,
    emit_json,
    fail,
    human_size,
    readable,
    run,
    settings_of,
    table,
    to_plain,
    with_api,
)
from datumflow.errors import DatumflowError
from datumflow.pfs.datums import check_input
from datumflow.pfs.paths import parse_job
from datumflow.runtime.status import read_status
from datumflow.spec import PipelineSpec, input_leaves, load_spec


def _read_spec(file: str) -> PipelineSpec:
    path = Path(file)
    try:
        text = path.read_bytes()
    except OSError as exc:
        fail(f"{file}: {exc.strerror}")
    try:
        spec = load_spec(text, source=file)
        check_input(spec.input)
    except DatumflowError as exc:
        fail(str(exc))
    return spec


def create_pipeline(
    ctx: typer.Context, file: str = typer.Option(..., "--file", "-f", help="Spec, JSON or YAML.")
) -> None:
    """Create a pipeline: its output repo, its consumers, and a job for the current inputs."""
    spec = _read_spec(file)
    settings = settings_of(ctx)

    async def body(api: Api) -> None:
        info = await api.pipelines.create(spec, ack_wait=api.settings.ack_wait)
        typer.echo(f"pipeline {info.name} created", err=True)

    run(with_api(settings, body))


def update_pipeline(
    ctx: typer.Context,
    file: str = typer.Option(..., "--file", "-f"),
    reprocess: bool = typer.Option(False, "--reprocess", help="Process every datum again."),
) -> None:
    """Update a pipeline; its next job skips unchanged datums unless --reprocess."""
    spec = _read_spec(file)

    async def body(api: Api) -> None:
        info = await api.pipelines.update(spec, ack_wait=api.settings.ack_wait, reprocess=reprocess)
        typer.echo(f"pipeline {info.name} updated to version {info.version}", err=True)

    run(with_api(settings_of(ctx), body))


def delete_pipeline(ctx: typer.Context, name: str) -> None:
    """Delete a pipeline, its jobs and its output repo."""

    async def body(api: Api) -> None:
        await api.pipelines.delete(name)

    run(with_api(settings_of(ctx), body))


def _input_text(info: PipelineInfo) -> str:
    return ", ".join(f"{x.repo}:{x.glob}" for x in input_leaves(info.spec.input))


def _status(settings_home: str) -> dict[str, dict[str, Any]]:
    """Per pipeline, what the local supervisor last wrote: state, workers, desired, lag."""
    return read_status(settings_home)


def _pipeline_view(
    info: PipelineInfo, status: dict[str, dict[str, Any]], last: JobInfo | None
) -> dict[str, Any]:
    s = status.get(info.name, {})
    autoscaled = info.spec.autoscaled
    workers = s.get("workers", 0)
    # The supervisor's word when there is one. Without it (no `datumflow up` on this machine, or
    # the pipeline not seen yet): an autoscaled pipeline without workers waits in standby.
    state = s.get("state") or ("standby" if autoscaled and not workers else "running")
    view = {
        "name": info.name,
        "version": info.version,
        "state": state,
        "input": _input_text(info),
        "parallelism": info.spec.parallelism_spec.constant
        or info.spec.parallelism_spec.coefficient
        or 1,
        "autoscaling": autoscaled,
        "workers": workers,
        "desired": s.get("desired", 0),
        "lag": s.get("lag"),
        "max_workers": s.get("max_workers"),
        "last_job": last.id if last else "",
        "last_job_state": last.state if last else "",
        "created": info.created,
        # Why the pipeline gets no workers; "" when it does.
        "reason": s.get("reason", ""),
    }
    return view


def list_pipeline(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """List pipelines with their state and workers."""
    settings = settings_of(ctx)

    async def body(api: Api) -> None:
        status = _status(api.settings.home)
        views = []
        for info in await api.pipelines.list():
            jobs = await api.pipelines.list_jobs(info.name)
            views.append(_pipeline_view(info, status, jobs[0] if jobs else None))
        if as_json:
            emit_json(views)
            return
        table(
            ["NAME", "VERSION", "INPUT", "STATE", "WORKERS", "LAST JOB", "CREATED"],
            [
                (
                    v["name"],
                    v["version"],
                    v["input"],
                    v["state"],
                    v["workers"],
                    v["last_job_state"],
                    ago(v["created"]),
                )
                for v in views
            ],
        )

    run(with_api(settings, body))


def inspect_pipeline(
    ctx: typer.Context, name: str, as_json: bool = typer.Option(False, "--json")
) -> None:
    """Show a pipeline's spec and state."""

    async def body(api: Api) -> None:
        info = await api.pipelines.get(name)
        jobs = await api.pipelines.list_jobs(name)
        view = _pipeline_view(info, _status(api.settings.home), jobs[0] if jobs else None)
        if as_json:
            emit_json({**view, "spec": info.spec})
        else:
            # The spec as it was written: fields left at their defaults stay out.
            typer.echo(_yamlish({**readable(view), "spec": msgspec.to_builtins(info.spec)}))

    run(with_api(settings_of(ctx), body))


def _yamlish(view: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(view, sort_keys=False, allow_unicode=True).rstrip()


def _job_row(j: JobInfo) -> tuple[str, ...]:
    done = j.data_processed + j.data_skipped
    progress = (
        f"{done} + {j.data_failed} failed / {j.data_total}"
        if j.data_failed
        else f"{done} / {j.data_total}"
    )
    return (
        j.pipeline,
        j.id,
        ago(j.started or j.created),
        duration(j.started, j.finished),
        progress,
        human_size(j.stats.download_bytes),
        human_size(j.stats.upload_bytes),
        j.state,
    )


def list_job(
    ctx: typer.Context,
    pipeline: str = typer.Option("", "--pipeline", "-p"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List jobs, newest first."""

    async def body(api: Api) -> None:
        if pipeline:
            await api.pipelines.get(pipeline)
        jobs = await api.pipelines.list_jobs(pipeline)
        if as_json:
            emit_json(jobs)
            return
        table(
            ["PIPELINE", "ID", "STARTED", "DURATION", "PROGRESS", "DL", "UL", "STATE"],
            [_job_row(j) for j in jobs],
        )

    run(with_api(settings_of(ctx), body))


def _job_address(text: str) -> tuple[str, str]:
    try:
        return parse_job(text)
    except DatumflowError as exc:
        fail(str(exc))


def inspect_job(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="PIPELINE@JOB"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show one job with its figures."""
    pipeline, job = _job_address(target)

    async def body(api: Api) -> None:
        info = await api.pipelines.get_job(pipeline, job)
        emit_json(info) if as_json else typer.echo(_yamlish(readable(to_plain(info))))

    run(with_api(settings_of(ctx), body))
