"""What every command shares: settings from the entry point, a connection, and output helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from datumflow.broker.connection import Broker, connect
from datumflow.broker.topology import ensure_topology
from datumflow.errors import DatumflowError
from datumflow.pfs.paths import FileAddress, parse_address
from datumflow.pfs.pipelines import Pipelines
from datumflow.pfs.repos import Repos
from datumflow.runtime.service import resolve
from datumflow.settings import Settings
from datumflow.storage import ObjectStore, open_store

T = TypeVar("T")
out = Console()
err = Console(stderr=True)


class Api(msgspec.Struct, kw_only=True):
    settings: Settings
    broker: Broker
    store: ObjectStore
    repos: Repos
    pipelines: Pipelines


def settings_of(ctx: typer.Context) -> Settings:
    settings = ctx.find_root().obj
    assert isinstance(settings, Settings)
    return settings


def address_of(text: str, *, need_path: bool = False) -> FileAddress:
    """Parse `REPO@BRANCH:/PATH` or exit with the reason."""
    try:
        return parse_address(text, need_path=need_path)
    except DatumflowError as exc:
        fail(str(exc))
        raise AssertionError("unreachable") from None


def fail(message: str, *, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run(coro: Awaitable[T]) -> T:
    """Run a command's coroutine, turning datumflow's errors into a message and exit code 1."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except DatumflowError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(str(exc))
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def open_api(settings: Settings) -> AsyncIterator[Api]:
    """A connection to the running datumflow named by the settings, with its repos and pipelines."""
    settings = resolve(settings)
    if not settings.nats_url:
        raise DatumflowError(
            f"no datumflow is running for {settings.home}: start one with `datumflow up`"
            " (or set DATUMFLOW_NATS_URL / --home)"
        )
    broker = await connect(settings=settings, name="datumflow-cli", reconnect=False)
    try:
        await ensure_topology(broker)
        store = await open_store(
            settings.storage_url(), endpoint=settings.s3_endpoint, region=settings.s3_region
        )
        try:
            repos = Repos(broker=broker, store=store)
            yield Api(
                settings=settings,
                broker=broker,
                store=store,
                repos=repos,
                pipelines=Pipelines(broker=broker, repos=repos),
            )
        finally:
            await store.close()
    finally:
        await broker.close()


async def with_api(settings: Settings, body: Callable[[Api], Awaitable[T]]) -> T:
    async with open_api(settings) as api:
        return await body(api)


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(msgspec.to_builtins(value), indent=2, sort_keys=False) + "\n")


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    t = Table(box=None, header_style="bold", pad_edge=False)
    for c in columns:
        t.add_column(c)
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    out.print(t)


def ago(timestamp: float) -> str:
    if not timestamp:
        return "-"
    seconds = max(time.time() - timestamp, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def duration(start: float, end: float) -> str:
    if not start:
        return "-"
    seconds = (end or time.time()) - start
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"
