"""`datumflow console`: the web console on its own, against the running `datumflow up` or a
broker named by DATUMFLOW_NATS_URL / --nats-url (datumflow.console)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
import typer

from datumflow.cli.context import fail, settings_of
from datumflow.errors import DatumflowError
from datumflow.runtime.service import resolve, stop_on_signals


def console(
    ctx: typer.Context,
    address: str = typer.Option(
        "", "--address", help="host:port to listen on [default: DATUMFLOW_CONSOLE_ADDRESS]"
    ),
    nats_url: str = typer.Option(
        "", "--nats-url", help="The broker to read [default: the running `datumflow up`'s]"
    ),
    url_home: str = typer.Option("", "--url-home", hidden=True),
) -> None:
    """Serve the web console: the DAG, jobs, datums, workers and commits, live in a browser."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = settings_of(ctx)
    if nats_url:
        settings = msgspec.structs.replace(settings, nats_url=nats_url)
    if address:
        settings = msgspec.structs.replace(settings, console_address=address)
    settings = resolve(settings)
    if not settings.nats_url:
        fail(
            f"no datumflow is running for {settings.home}: start one with `datumflow up`, or"
            " name a broker with --nats-url"
        )
    if not settings.console:
        fail("no address to listen on: give --address host:port")

    from datumflow.console.run import run_console

    async def main() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        await run_console(
            settings=settings,
            stop=stop,
            url_home=Path(url_home) if url_home else None,
            local_home=settings.home_path,
            announce=lambda line: typer.echo(line, err=bool(url_home)),
        )

    try:
        asyncio.run(main())
    except DatumflowError as exc:
        fail(str(exc))
