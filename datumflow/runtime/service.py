"""Running one function as a process: settings, connection, signals, clean shutdown.

`datumflow planner`, `committer`, `worker` and `ingest` each call `serve`, locally under the
supervisor and in a container alike.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from datumflow.broker.connection import Broker, connect
from datumflow.broker.topology import ensure_topology
from datumflow.errors import BrokerError
from datumflow.runtime.embedded import read_instance
from datumflow.settings import Settings
from datumflow.storage import ObjectStore, open_store

log = logging.getLogger(__name__)

Body = Callable[[Broker, ObjectStore, asyncio.Event], Awaitable[None]]


def resolve(settings: Settings) -> Settings:
    """Fill in the broker and store of the running `datumflow up` when none is named."""
    if settings.nats_url:
        return settings
    instance = read_instance(Path(settings.home))
    if instance is None:
        return settings
    return msgspec.structs.replace(
        settings,
        nats_url=instance.nats_url,
        monitor_url=settings.monitor_url or instance.monitor_url,
        storage=settings.storage or instance.storage,
    )


async def connect_patiently(*, settings: Settings, name: str, patience: float = 60.0) -> Broker:
    """Connect, waiting for a broker that is (re)starting, then declare the topology."""
    delay, waited = 0.2, 0.0
    while True:
        try:
            broker = await connect(settings=settings, name=name)
            await ensure_topology(broker)
            return broker
        except BrokerError as exc:
            if waited >= patience:
                raise
            log.warning("%s; retrying", exc)
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 2.0)


def stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def serve(*, settings: Settings, name: str, body: Body) -> None:
    stop = asyncio.Event()
    stop_on_signals(stop)
    broker = await connect_patiently(settings=settings, name=name)
    store = await open_store(
        settings.storage_url(), endpoint=settings.s3_endpoint, region=settings.s3_region
    )
    try:
        await body(broker, store, stop)
    finally:
        await store.close()
        await broker.close()
