"""What every command shares: settings from the entry point, a connection, and output helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, NoReturn, TypeVar

import msgspec
import typer

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
    typer.secho("error:", fg="red", bold=True, err=True, nl=False)
    typer.echo(f" {message}", err=True)
    raise typer.Exit(code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, turning datumflow's errors into a message and exit code 1."""
    try:
        return asyncio.run(coro)
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


def to_plain(value: Any) -> Any:
    """`value` as JSON-ready builtins with every field of every Struct, also those at their
    defaults: records omit defaults on the wire, but a script filtering `--json` output on
    `.origin == "user"` or `.data_failed == 0` must find the field there."""
    if isinstance(value, msgspec.Struct):
        return {
            f.encode_name: to_plain(getattr(value, f.name)) for f in msgspec.structs.fields(value)
        }
    if isinstance(value, dict):
        return {msgspec.to_builtins(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_plain(v) for v in value]
    return msgspec.to_builtins(value)


def emit_json(value: Any) -> None:
    """Print `value` as JSON with every field, whatever its value (see `to_plain`)."""
    sys.stdout.write(json.dumps(to_plain(value), indent=2, sort_keys=False) + "\n")


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Aligned columns that are never cut: ids are copied from here into other commands, and a
    terminal-width table would shorten them."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    for row in [list(columns), *cells]:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def ago(timestamp: float) -> str:
    if not timestamp:
        return "-"
    seconds = max(time.time() - timestamp, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def when(timestamp: float) -> str:
    """A Unix time as local date and time, with how long ago: `2026-12-07 01:52:10 (3m ago)`."""
    if not timestamp:
        return "-"
    local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
    return f"{local} ({ago(timestamp)})"


def seconds_text(seconds: float) -> str:
    """A duration in the unit a person reads it in: `40 µs`, `152 ms`, `2.4 s`, `3m 5s`, `2h 10m`."""
    if seconds <= 0:
        return "0 s"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m {whole % 60}s"
    return f"{whole // 3600}h {whole % 3600 // 60}m"


def duration(start: float, end: float) -> str:
    if not start:
        return "-"
    return seconds_text((end or time.time()) - start)


TIME_FIELDS = frozenset({"created", "updated", "started", "finished"})
"""Fields of records and views that hold a Unix time."""


def readable(value: Any, key: str = "") -> Any:
    """A record or view (as builtins) for people: Unix times as local times, durations (`time`,
    `*_time`) in their unit, `*_bytes` as sizes. `--json` shows the numbers as they are."""
    if isinstance(value, dict):
        return {k: readable(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [readable(v, key) for v in value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if key in TIME_FIELDS:
        return when(value)
    if key == "time" or key.endswith("_time"):
        return seconds_text(value)
    if key.endswith("_bytes"):
        return human_size(int(value))
    return value


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"
