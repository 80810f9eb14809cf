"""The `datumflow` command: pachctl's words for repos, files, pipelines and jobs.

Commands are registered by name and loaded when they run: each command module pulls in the broker
client, the object store or the Kubernetes client it needs, and a command should not pay for the
others (`datumflow --help` loads none of them). The table below names each command's module and
function with the one-line help that `--help` lists; tests/test_cli_imports.py checks that line
against the function's docstring.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, ClassVar, NamedTuple

import typer
from typer.core import TyperCommand, TyperGroup

from datumflow.settings import Settings


class Lazy(NamedTuple):
    module: str
    """Under datumflow.cli."""
    function: str
    help: str
    """The first line of the function's docstring, shown by --help without loading the module."""


GROUPS: dict[str, str] = {
    "create": "Create a repo or a pipeline.",
    "update": "Update a pipeline.",
    "delete": "Delete a repo or a pipeline.",
    "list": "List repos, commits, files, pipelines, jobs, datums or leases.",
    "inspect": "Show one commit, pipeline, job or datum.",
    "put": "Put files into a repo.",
    "get": "Get a file out of a repo.",
    "wait": "Wait for a job, or for a commit and everything downstream of it.",
    "rerun": "Run a job's failed datums again.",
    "render": "Print Kubernetes objects for kubectl.",
    "next": "Ask the worker for the next datum (user code of datum-batching pipelines).",
}

COMMANDS: dict[str, dict[str, Lazy]] = {
    "create": {
        "repo": Lazy(
            "pfs_commands",
            "create_repo",
            "Create a repo, optionally fed from a bucket's notifications.",
        ),
        "pipeline": Lazy(
            "pps_commands",
            "create_pipeline",
            "Create a pipeline: its output repo, its consumers, and a job for the current inputs.",
        ),
    },
    "update": {
        "pipeline": Lazy(
            "pps_commands",
            "update_pipeline",
            "Update a pipeline; its next job skips unchanged datums unless --reprocess.",
        ),
    },
    "delete": {
        "repo": Lazy("pfs_commands", "delete_repo", "Delete a repo with its branches and commits."),
        "pipeline": Lazy(
            "pps_commands", "delete_pipeline", "Delete a pipeline, its jobs and its output repo."
        ),
    },
    "list": {
        "repo": Lazy("pfs_commands", "list_repo", "List repos."),
        "commit": Lazy(
            "pfs_commands", "list_commit", "List the commits of a branch, newest first."
        ),
        "file": Lazy(
            "pfs_commands",
            "list_file",
            "List the files and directories directly under a directory.",
        ),
        "pipeline": Lazy(
            "pps_commands", "list_pipeline", "List pipelines with their state and workers."
        ),
        "job": Lazy("pps_commands", "list_job", "List jobs, newest first."),
        "lease": Lazy(
            "lease_commands",
            "list_lease",
            "List the active replica of the committer and of ingest (the holders of their leases).",
        ),
        "datum": Lazy(
            "datum_commands",
            "list_datum",
            "List a job's datums, or (with -f SPEC) the datums a spec would run on the branch heads.",
        ),
    },
    "inspect": {
        "commit": Lazy(
            "pfs_commands", "inspect_commit", "Show one commit (a commit id or a branch name)."
        ),
        "pipeline": Lazy("pps_commands", "inspect_pipeline", "Show a pipeline's spec and state."),
        "job": Lazy("pps_commands", "inspect_job", "Show one job with its figures."),
        "datum": Lazy(
            "datum_commands",
            "inspect_datum",
            "Show one datum of a job: state, files, error, attempts, stats, logs and output.",
        ),
    },
    "put": {
        "file": Lazy(
            "pfs_commands",
            "put_file",
            "Put a file, a directory (-r) or stdin (-f -) into a branch, as one commit.",
        ),
    },
    "get": {
        "file": Lazy("pfs_commands", "get_file", "Print a file, or write it with -o."),
    },
    "wait": {
        "job": Lazy(
            "wait_commands", "wait_job", "Wait until a job is done; exit 1 unless it succeeded."
        ),
        "commit": Lazy(
            "wait_commands",
            "wait_commit",
            "Wait until a branch head and every job downstream of it are done; exit 1 if one failed.",
        ),
    },
    "rerun": {
        "job": Lazy(
            "rerun_commands",
            "rerun_job",
            "Run the failed datums of a finished job again, keeping the outputs of the others.",
        ),
    },
    "render": {
        "pipeline": Lazy(
            "deploy_commands",
            "render_pipeline_command",
            "Print a pipeline's worker Deployment and KEDA ScaledObject as YAML, for `kubectl apply -f -`.",
        ),
    },
    "next": {
        "datum": Lazy(
            "next_commands",
            "next_datum",
            "Report the datum in hand done (or failed) and wait for the next; exit 3 when none is left.",
        ),
    },
    "": {
        "logs": Lazy(
            "datum_commands",
            "logs",
            "Print the stdout and stderr of the user code, datum by datum.",
        ),
        "demo": Lazy(
            "run_commands",
            "demo",
            "Start a private datumflow, run a two-stage DAG over sample files, print the result, stop.",
        ),
        "up": Lazy(
            "run_commands",
            "up",
            "Start the broker, the functions and the workers; runs until interrupted.",
        ),
        "down": Lazy("run_commands", "down", "Stop the datumflow started with `up --detach`."),
        "planner": Lazy(
            "run_commands", "planner", "Run the planner (commit events → jobs and datums)."
        ),
        "committer": Lazy(
            "run_commands", "committer", "Run the committer (datum results → output commits)."
        ),
        "worker": Lazy(
            "run_commands",
            "worker",
            "Run one worker of a pipeline: the entry point of local worker processes and pods.",
        ),
        "ingest": Lazy(
            "ingest_commands",
            "ingest",
            "Run the ingest function (bucket notifications → commits).",
        ),
        "controller": Lazy(
            "deploy_commands",
            "controller_command",
            "Keep every pipeline's worker Deployment and ScaledObject applied (runs in the cluster).",
        ),
        "console": Lazy(
            "console_commands",
            "console",
            "Serve the web console: the DAG, jobs, datums, workers and commits, live in a browser.",
        ),
        "schema": Lazy(
            "run_commands",
            "schema",
            "Print the JSON Schema of a wire message, for producers outside datumflow.",
        ),
    },
}


def load(lazy: Lazy, name: str) -> TyperCommand:
    """The command `name` built from its function, importing its module now."""
    module = importlib.import_module(f"datumflow.cli.{lazy.module}")
    single = typer.Typer(add_completion=False, rich_markup_mode=None)
    single.command(name)(getattr(module, lazy.function))
    command = typer.main.get_command(single)
    assert isinstance(command, TyperCommand)
    return command


def plain_strings(command: Any, ctx: Any) -> None:
    """Take the values of `command`'s string and flag options as click parsed them.

    Some typer releases check every option's value with a pydantic TypeAdapter, built on first
    use: importing pydantic for that is about 90 ms of a command's start, for a string that click
    already parsed. Those releases keep the checker in `_runtime_param`, made when still None; a
    pass-through checker put there first makes the same decision for `str` and `bool` (a value
    of that type is accepted; None is never checked). Other releases have no such attribute, and
    this does nothing.
    """
    try:
        from typer._coercion import PassThroughRuntimeParam
    except ImportError:
        return
    for param in command.get_params(ctx):  # with --help, made on first use
        descriptor = getattr(param, "type_descriptor", None)
        if getattr(param, "_runtime_param", False) is not None or descriptor is None:
            continue
        if descriptor.annotation in (str, bool) and not param.multiple and param.nargs == 1:
            try:
                param._runtime_param = PassThroughRuntimeParam(
                    annotation=descriptor.annotation, parameter_info=descriptor.parameter_info
                )
            except TypeError:
                return  # another shape of that private class: leave typer's own checker be


def lazy_group(group: str) -> type[TyperGroup]:
    """A group whose commands (COMMANDS[group]) are built when they are run or their own help is
    asked for; the group's help lists them from the table."""

    class LazyGroup(TyperGroup):
        table: ClassVar[dict[str, Lazy]] = COMMANDS[group]

        def list_commands(self, ctx: Any) -> list[str]:
            return [*super().list_commands(ctx), *(n for n in self.table if n not in self.commands)]

        def get_command(self, ctx: Any, cmd_name: str) -> Any:
            command = super().get_command(ctx, cmd_name)
            if command is None and cmd_name in self.table:
                # Only a line in a listing: the real command is built by resolve_command.
                return TyperCommand(name=cmd_name, help=self.table[cmd_name].help)
            return command

        def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
            plain_strings(self, ctx)
            return super().parse_args(ctx, args)

        def resolve_command(self, ctx: Any, args: list[str]) -> Any:
            if args and args[0] in self.table and args[0] not in self.commands:
                self.commands[args[0]] = load(self.table[args[0]], args[0])
            try:
                name, command, rest = super().resolve_command(ctx, args)
            except Exception as exc:
                # typer suggests among the commands built so far; a typo of one still in the
                # table deserves the same "Did you mean" (a usage error has a `message`).
                message = getattr(exc, "message", None)
                if isinstance(message, str) and args and "Did you mean" not in message:
                    matches = difflib.get_close_matches(args[0], self.list_commands(ctx))
                    if matches:
                        shown = ", ".join(repr(m) for m in matches)
                        exc.message = f"{message.rstrip('.')}. Did you mean {shown}?"  # type: ignore[attr-defined]
                raise
            if command is not None and not isinstance(command, TyperGroup):
                plain_strings(command, ctx)
            return name, command, rest

    return LazyGroup


app = typer.Typer(
    cls=lazy_group(""),
    help="Datum-parallel data pipelines on NATS JetStream.",
    no_args_is_help=True,
    # Plain help and usage errors: typer's rich rendering imports rich and markdown-it, which
    # would double the time `datumflow --help` takes.
    rich_markup_mode=None,
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


for _name, _help in GROUPS.items():
    app.add_typer(typer.Typer(cls=lazy_group(_name), help=_help, no_args_is_help=True), name=_name)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
