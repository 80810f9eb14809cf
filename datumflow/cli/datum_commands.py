"""The datum commands: `list datum`, `inspect datum` and `logs`.

What they show of a job's datums comes from datumflow.cli.job_view; `logs` prints through
datumflow.cli.log_follower.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from datumflow.cli.context import (
    Api,
    emit_json,
    fail,
    readable,
    run,
    seconds_text,
    settings_of,
    table,
    to_plain,
    with_api,
)
from datumflow.cli.job_view import (
    DatumFile,
    JobDatum,
    JobView,
    PlannedDatum,
    datum_seconds,
    planned_datums,
)
from datumflow.cli.log_follower import LiveLogs, print_stored_logs
from datumflow.errors import DatumflowError
from datumflow.pfs import manifest
from datumflow.pfs.datums import check_input
from datumflow.pfs.paths import parse_job
from datumflow.spec import PipelineSpec, load_spec


def _files_text(files: list[DatumFile]) -> str:
    return ", ".join(f"{f.repo}:{f.path}" for f in files)


def list_datum(
    ctx: typer.Context,
    target: str = typer.Argument(
        "", metavar="[PIPELINE@JOB]", help="A job; or give --file for a dry run."
    ),
    file: str = typer.Option(
        "", "--file", "-f", help="A pipeline spec: list the datums its input gives now."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List a job's datums, or (with -f SPEC) the datums a spec would run on the branch heads."""
    if bool(target) == bool(file):
        fail("give either PIPELINE@JOB or --file SPEC (a dry run), not both nor neither")
    settings = settings_of(ctx)
    if file:
        spec = _read_spec(file)

        async def dry(api: Api) -> list[PlannedDatum]:
            return await planned_datums(api, spec)

        planned = run(with_api(settings, dry))
        if as_json:
            emit_json(planned)
        else:
            table(["ID", "FILES"], [(d.id, _files_text(d.files)) for d in planned])
        return
    pipeline, job = _job_address(target)

    async def body(api: Api) -> list[JobDatum]:
        view = await JobView.load(api, pipeline, job)
        return view.datums()

    datums = run(with_api(settings, body))
    if as_json:
        emit_json(datums)
    else:
        table(
            ["ID", "FILES", "STATUS", "TIME"],
            [
                (d.id, _files_text(d.files), d.state, seconds_text(d.time) if d.time else "-")
                for d in datums
            ],
        )


def _read_spec(file: str) -> PipelineSpec:
    try:
        text = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        fail(f"{file}: {exc.strerror}")
    try:
        spec = load_spec(text, source=file)
        check_input(spec.input)
    except DatumflowError as exc:
        fail(str(exc))
    return spec


def _job_address(text: str) -> tuple[str, str]:
    try:
        return parse_job(text)
    except DatumflowError as exc:
        fail(str(exc))


def inspect_datum(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="PIPELINE@JOB"),
    datum: str = typer.Argument(..., metavar="ID", help="The datum id, or its first characters."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show one datum of a job: state, files, error, attempts, stats, logs and output."""
    pipeline, job = _job_address(target)

    async def body(api: Api) -> dict[str, Any]:
        view = await JobView.load(api, pipeline, job)
        did = view.find(datum)
        result = view.first.get(did)
        inputs = view.inputs(did) or []
        detail: dict[str, Any] = {
            "id": did,
            "pipeline": pipeline,
            "job": job,
            "state": view.state(did),
            "hash": result.hash if result else (view.index[did].hash if did in view.index else ""),
            "time": datum_seconds(view.counted(did)),
            "files": to_plain(view.files(did)),
            "inputs": [
                {
                    "input": i.name,
                    "repo": i.repo,
                    "branch": i.branch,
                    "commit": i.commit,
                    "path": i.root,
                    "files": [f.path for f in i.files],
                }
                for i in inputs
            ],
        }
        if result is not None:
            output = await manifest.read(api.store, result.output) if result.output else []
            detail |= {
                # A result that came after its job ended (killed) is shown, but did not count.
                "counted": view.counted(did) is not None,
                "attempts": result.attempts,
                "error": result.error,
                "stats": to_plain(result.stats),
                "logs": result.logs,
                "output": result.output,
                "output_files": [f.path for f in output],
            }
        return detail

    detail = run(with_api(settings_of(ctx), body))
    if as_json:
        emit_json(detail)
    else:
        import yaml

        typer.echo(yaml.safe_dump(readable(detail), sort_keys=False, allow_unicode=True).rstrip())


def logs(
    ctx: typer.Context,
    pipeline: str = typer.Option(..., "--pipeline", "-p"),
    job: str = typer.Option(
        "", "--job", "-j", help="A job id (default: the pipeline's newest job)."
    ),
    datum: str = typer.Option("", "--datum", help="A datum id, or its first characters."),
    follow: bool = typer.Option(
        False,
        "--follow",
        "-f",
        help="Then stream output as the user code writes it: until the job ends with -j, else"
        " until interrupted (every job of the pipeline).",
    ),
) -> None:
    """Print the stdout and stderr of the user code, datum by datum."""

    async def body(api: Api) -> None:
        await api.pipelines.get(pipeline)
        live = LiveLogs(api, pipeline, job, datum) if follow else None
        if live is not None:
            await live.start()
        try:
            head = await api.pipelines.heads.find(pipeline)
            job_id = job or (head.last_job if head else "")
            printed: set[str] = set()
            if job_id:
                printed = await print_stored_logs(api, pipeline, job_id, datum, strict=not follow)
            elif live is None:
                raise DatumflowError(f"pipeline {pipeline} has run no job yet")
            if live is not None:
                await live.follow(skip=printed, stored_job=job_id)
        finally:
            if live is not None:
                await live.close()

    run(with_api(settings_of(ctx), body))
