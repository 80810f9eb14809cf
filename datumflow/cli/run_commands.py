"""Running datumflow: `up`, `down`, and the function entry points a container runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import typer

from datumflow.broker.lease import Lease
from datumflow.broker.messages import commit_event_schema
from datumflow.cli.context import emit_json, fail, settings_of
from datumflow.errors import DatumflowError
from datumflow.functions.committer import Committer
from datumflow.functions.planner import Planner
from datumflow.functions.worker.proctree import alive
from datumflow.functions.worker.sandbox import choose_mode, user_code_run_as
from datumflow.functions.worker.worker import Worker, default_scratch
from datumflow.runtime import secure
from datumflow.runtime.embedded import read_instance, server_binary
from datumflow.runtime.leader import lead
from datumflow.runtime.service import resolve, serve, stop_on_signals
from datumflow.runtime.status import read_console_url
from datumflow.runtime.supervisor import Supervisor

if TYPE_CHECKING:
    from datumflow.broker.connection import Broker
    from datumflow.storage.base import ObjectStore


def _logging(verbose: bool = True) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def up(
    ctx: typer.Context,
    detach: bool = typer.Option(False, "--detach", "-d", help="Run in the background."),
    storage: str = typer.Option("", "--storage", help="file:///path or s3://bucket/prefix"),
    secure_: bool = typer.Option(
        False,
        "--secure",
        help="Require a generated password and TLS on the embedded broker (kept in HOME/secure).",
    ),
    replicas: int = typer.Option(
        0,
        "--replicas",
        help="Processes of each of planner, committer and ingest; with 2 any one may die"
        " [default: DATUMFLOW_CONTROL_REPLICAS, else 1].",
    ),
) -> None:
    """Start the broker, the functions and the workers; runs until interrupted."""
    settings = settings_of(ctx)
    if storage:
        settings = msgspec.structs.replace(settings, storage=storage)
    if replicas < 0:
        fail("--replicas must be at least 1")
    if replicas:
        settings = msgspec.structs.replace(settings, control_replicas=replicas)
    if settings.replicas > 1 and not settings.nats_url:
        fail(
            f"DATUMFLOW_REPLICAS={settings.replicas} needs a cluster of nats-servers, and the"
            " embedded broker is one: set DATUMFLOW_NATS_URL to the cluster's servers, or"
            " DATUMFLOW_REPLICAS=1"
        )
    home = Path(settings.home).resolve()
    existing = read_instance(home)
    if existing is not None and alive(existing.pid):
        fail(
            f"datumflow is already running for {home} (pid {existing.pid}); `datumflow down` stops it"
        )
    if secure_ and settings.nats_url:
        fail(
            "--secure secures the embedded broker, but DATUMFLOW_NATS_URL names another one:"
            " configure that broker's own authorization and TLS, and give datumflow its"
            " credentials (DATUMFLOW_NATS_USER/PASSWORD, _TOKEN, _CREDS or _NKEY_SEED, _TLS_CA)"
        )
    if not settings.nats_url and (secure_ or secure.load(home) is not None):
        # Made once, then kept: a secured state directory stays secured.
        settings = secure.apply(settings, secure.ensure(home))
        if not settings.user_code_user:
            # User code then cannot read the password from the functions' environments.
            settings = msgspec.structs.replace(settings, user_code_user="nobody")
    if not settings.nats_url:
        try:
            server_binary(settings.nats_server)
        except RuntimeError as exc:
            fail(str(exc))
    try:
        # Refused here, once, rather than by every worker it would start.
        user_code_run_as(
            user=settings.user_code_user,
            wanted=settings.pfs_mode,
            mode=choose_mode(settings.pfs_mode),
        )
    except (ValueError, RuntimeError, DatumflowError) as exc:
        fail(str(exc))
    if detach:
        home.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "datumflow.cli.main", "--home", str(home), "up"]
        if storage:
            argv += ["--storage", storage]
        if secure_:
            argv += ["--secure"]
        if replicas:
            argv += ["--replicas", str(replicas)]
        # up prints the console's URL, token and all, to this log: its owner alone reads it.
        fd = os.open(home / "up.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "ab") as log_file:
            proc = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            instance = read_instance(home)
            if instance is not None and instance.pid == proc.pid:
                typer.echo(
                    f"datumflow is up (pid {proc.pid}); broker {instance.nats_url}; logs in {home / 'logs'}"
                )
                if instance.metrics_url:
                    typer.echo(f"metrics of every datumflow process: {instance.metrics_url}")
                if settings.console:
                    url = _console_url(home, proc)
                    typer.echo(f"console: {url}" if url else f"console: see {home / 'logs'}")
                return
            if proc.poll() is not None:
                fail(f"datumflow up exited with code {proc.returncode}; see {home / 'up.log'}")
            time.sleep(0.1)
        fail(f"datumflow up did not start within 60s; see {home / 'up.log'}")
    _logging()

    async def main() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        supervisor = Supervisor(settings=settings, embedded=not settings.nats_url)
        await supervisor.run(stop)

    try:
        asyncio.run(main())
    except DatumflowError as exc:
        # A broker that cannot keep the topology as asked, for one: the message says what to do.
        fail(str(exc))


def _console_url(home: Path, proc: subprocess.Popen[bytes], *, patience: float = 20) -> str:
    """The URL of the console `up` started, once it listens; "" if it did not within `patience`."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline and proc.poll() is None:
        url = read_console_url(home)
        if url:
            return url
        time.sleep(0.1)
    return ""


def down(ctx: typer.Context, timeout: float = typer.Option(60, "--timeout")) -> None:
    """Stop the datumflow started with `up --detach`."""
    home = Path(settings_of(ctx).home).resolve()
    instance = read_instance(home)
    if instance is None or not alive(instance.pid):
        fail(f"no datumflow is running for {home}")
    os.kill(instance.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(instance.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(instance.pid):
        fail(f"datumflow (pid {instance.pid}) did not stop within {timeout:.0f}s")
    typer.echo("datumflow is down")


def planner(ctx: typer.Context) -> None:
    """Run the planner (commit events → jobs and datums)."""
    _logging()
    settings = resolve(settings_of(ctx))

    async def body(broker: Broker, store: ObjectStore, stop: asyncio.Event) -> None:
        scratch = Path(settings.home).resolve() / "scratch" / "planner"
        scratch.mkdir(parents=True, exist_ok=True)
        await Planner(broker=broker, store=store, scratch=scratch).run(stop)

    asyncio.run(serve(settings=settings, name="datumflow-planner", body=body))


def committer(ctx: typer.Context) -> None:
    """Run the committer (datum results → output commits)."""
    _logging()
    settings = resolve(settings_of(ctx))

    async def body(broker: Broker, store: ObjectStore, stop: asyncio.Event) -> None:
        # Active/standby: any number of committers run, the one holding the lease commits.
        async def term(lease: Lease, until: asyncio.Event) -> None:
            await Committer(broker=broker, store=store, lease=lease).run(until)

        await lead(lease=Lease(broker, name="committer"), stop=stop, body=term)

    asyncio.run(serve(settings=settings, name="datumflow-committer", body=body))


def worker(ctx: typer.Context, pipeline: str = typer.Option(..., "--pipeline", "-p")) -> None:
    """Run one worker of a pipeline: the entry point of local worker processes and pods."""
    _logging()
    settings = resolve(settings_of(ctx))

    async def body(broker: Broker, store: ObjectStore, stop: asyncio.Event) -> None:
        from datumflow.functions.worker.pod_cost import worker_marker

        # Busy or idle, so that a scale-down stops idle workers first: the pod's deletion cost
        # in Kubernetes, the supervisor's busy file on one machine.
        marker = worker_marker(
            pod_name=settings.pod_name or None,
            namespace=settings.pod_namespace or None,
            busy_file=settings.busy_file or None,
        )
        w = Worker(
            broker=broker,
            store=store,
            pipeline=pipeline,
            scratch=default_scratch(Path(settings.home).resolve()),
            ack_wait=settings.ack_wait,
            pfs_mode=settings.pfs_mode,
            grace=settings.grace,
            marker=marker,
            user_code_user=settings.user_code_user,
        )
        with contextlib.suppress(asyncio.CancelledError):
            await w.run(stop)

    asyncio.run(serve(settings=settings, name=f"datumflow-worker-{pipeline}", body=body))


def schema(what: str = typer.Argument(..., metavar="commit-event")) -> None:
    """Print the JSON Schema of a wire message, for producers outside datumflow."""
    if what != "commit-event":
        fail(f"unknown schema {what!r}; known: commit-event")
    emit_json(commit_event_schema())


def demo(
    ctx: typer.Context,
    files: int = typer.Option(20, "--files", help="How many sample files to process."),
) -> None:
    """Start a private datumflow, run a two-stage DAG over sample files, print the result, stop."""
    from rich.console import Console

    from datumflow.cli.demo import run_demo

    logging.basicConfig(level=logging.WARNING)
    try:
        nats_server = settings_of(ctx).nats_server
        asyncio.run(run_demo(files=files, console=Console(), nats_server=nats_server))
    except RuntimeError as exc:
        fail(str(exc))
