"""The `datumflow` command: pachctl's words for repos, files, pipelines and jobs."""

from __future__ import annotations

import typer

from datumflow.cli import datum_commands, deploy_commands, ingest_commands
from datumflow.cli import pfs_commands as pfs
from datumflow.cli import pps_commands as pps
from datumflow.cli import run_commands as runs
from datumflow.settings import Settings

app = typer.Typer(
    help="Datum-parallel data pipelines on NATS JetStream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def root(
    ctx: typer.Context,
    home: str = typer.Option(
        None, "--home", envvar="DATUMFLOW_HOME", help="State directory [default: ./.datumflow]"
    ),
) -> None:
    # Settings are built once, here, and handed to every command through the context.
    try:
        ctx.obj = Settings.from_env(home=home)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def group(name: str, help: str) -> typer.Typer:
    sub = typer.Typer(help=help, no_args_is_help=True)
    app.add_typer(sub, name=name)
    return sub


create = group("create", "Create a repo or a pipeline.")
create.command("repo")(pfs.create_repo)
create.command("pipeline")(pps.create_pipeline)

update = group("update", "Update a pipeline.")
update.command("pipeline")(pps.update_pipeline)

delete = group("delete", "Delete a repo or a pipeline.")
delete.command("repo")(pfs.delete_repo)
delete.command("pipeline")(pps.delete_pipeline)

list_ = group("list", "List repos, commits, files, pipelines, jobs or datums.")
list_.command("repo")(pfs.list_repo)
list_.command("commit")(pfs.list_commit)
list_.command("file")(pfs.list_file)
list_.command("pipeline")(pps.list_pipeline)
list_.command("job")(pps.list_job)

inspect = group("inspect", "Show one commit, pipeline or job.")
inspect.command("commit")(pfs.inspect_commit)
inspect.command("pipeline")(pps.inspect_pipeline)
inspect.command("job")(pps.inspect_job)

put = group("put", "Put files into a repo.")
put.command("file")(pfs.put_file)

get = group("get", "Get a file out of a repo.")
get.command("file")(pfs.get_file)

wait = group("wait", "Wait for a job, or for a commit and everything downstream of it.")
wait.command("job")(pps.wait_job)
wait.command("commit")(pps.wait_commit)

app.command()(runs.demo)
app.command()(runs.up)
app.command()(runs.down)
app.command()(runs.planner)
app.command()(runs.committer)
app.command()(runs.worker)
app.command()(runs.schema)

groups = {
    "create": create,
    "update": update,
    "delete": delete,
    "list": list_,
    "inspect": inspect,
    "put": put,
    "get": get,
    "wait": wait,
}
for module in (datum_commands, ingest_commands, deploy_commands):
    module.register(app, groups)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
