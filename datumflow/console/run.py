"""Running the console: connect to the broker and the store, listen, say where, serve until told
to stop. `datumflow console` runs it alone; `datumflow up` runs the same command as a child and
prints the URL it writes to `<home>/console.json` (datumflow.runtime.status)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from datumflow.console import auth
from datumflow.console.samples import Sampler
from datumflow.console.server import make_app, serve_until, start_site
from datumflow.console.views import Views
from datumflow.errors import DatumflowError
from datumflow.runtime.service import connect_patiently, open_function_store
from datumflow.runtime.status import CONSOLE_FILE, read_console_url, write_console_url
from datumflow.settings import Settings

log = logging.getLogger(__name__)


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` (`[::1]:7480` for IPv6) → (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise DatumflowError(
            f"console address {address!r}: expected host:port, e.g. 127.0.0.1:7480"
        )
    return host.strip("[]") or "0.0.0.0", int(port)


def console_url(host: str, port: int, token: str) -> str:
    """The URL to open: with the token, so that the page may act (and read beyond loopback)."""
    shown = host
    if host in ("0.0.0.0", "::", ""):
        shown = "127.0.0.1"  # every address: this machine's is one of them
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/?{auth.TOKEN_QUERY}={token}"


async def run_console(
    *,
    settings: Settings,
    stop: asyncio.Event,
    url_home: Path | None = None,
    local_home: Path | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve the console on `settings.console_address` until `stop`.

    `local_home`: the state directory of a `datumflow up` on this machine, whose scaler's status
    the workers chart reads. `url_home`: the state directory to write the URL to (under `up`,
    which then falls back to a free port when the address is taken).
    """
    host, port = parse_address(settings.console_address)
    loopback = auth.is_loopback(host)
    token = settings.console_token or auth.new_token()
    broker = await connect_patiently(settings=settings, name="datumflow-console")
    try:
        store = await open_function_store(settings=settings, function="console")
        try:
            views = Views(broker=broker, store=store)
            try:
                sampler = Sampler(broker=broker, home=local_home)
                app = make_app(views=views, sampler=sampler, token=token, loopback=loopback)
                runner, bound = await start_site(
                    app, host=host, port=port, fallback=url_home is not None
                )
                url = console_url(host, bound, token)
                if url_home is not None:
                    write_console_url(url_home, url)
                where = "this machine only" if loopback else "every client with the token"
                # Under `up` this line goes to a log file anyone may read: the URL with the token is
                # in console.json (owner-readable only), and `up` prints it.
                shown = url if url_home is None else url.split("?")[0]
                announce(f"datumflow console: {shown} ({where})")
                try:
                    await serve_until(app, runner, stop)
                finally:
                    if url_home is not None and read_console_url(url_home) == url:
                        (url_home / CONSOLE_FILE).unlink(missing_ok=True)
            finally:
                await views.close()
        finally:
            await store.close()
    finally:
        await broker.close()
