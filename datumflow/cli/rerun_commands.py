"""`datumflow rerun job PIPELINE@JOB --failed`: run a job's failed datums again, in a new job on
the same input commits that carries the others over (datumflow.pfs.reruns)."""

from __future__ import annotations

import typer

from datumflow.cli.context import Api, emit_json, fail, run, settings_of, with_api
from datumflow.errors import DatumflowError
from datumflow.pfs.paths import parse_job
from datumflow.pfs.reruns import NothingToRerun, Rerun, rerun_failed


def rerun_job(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="PIPELINE@JOB"),
    failed: bool = typer.Option(False, "--failed", help="Run the job's failed datums again."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run the failed datums of a finished job again, keeping the outputs of the others.

    The rerun is a new job on the job's input commits: its other datums are carried over
    (skipped, their outputs kept), so its output commit has every datum's output once. Only the
    pipeline's newest job can be rerun. Prints the new job as PIPELINE@JOB, for `wait job`; with
    no failed datum, says so and does nothing (exit 0)."""
    if not failed:
        fail("say what to rerun: `--failed` runs the job's failed datums again")
    try:
        pipeline, job = parse_job(target)
    except DatumflowError as exc:
        fail(str(exc))

    async def body(api: Api) -> Rerun | None:
        try:
            return await rerun_failed(
                broker=api.broker, store=api.store, pipeline=pipeline, job=job
            )
        except NothingToRerun as exc:
            typer.echo(str(exc), err=True)
            return None

    rerun = run(with_api(settings_of(ctx), body))
    if rerun is None:
        return
    if as_json:
        emit_json(rerun)
        return
    typer.echo(
        f"rerunning {rerun.rerun} datum(s) of {pipeline}@{job}, {rerun.carried} carried over",
        err=True,
    )
    typer.echo(f"{pipeline}@{rerun.new_job}")
