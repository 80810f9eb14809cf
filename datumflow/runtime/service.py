"""Running one function as a process: settings, connection, signals, clean shutdown.

`datumflow planner`, `committer`, `worker` and `ingest` each call `serve`, locally under the
supervisor and in a container alike.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from datumflow import metrics
from datumflow.broker.connection import Broker, connect
from datumflow.broker.topology import ensure_topology
from datumflow.errors import BrokerError
from datumflow.runtime import secure
from datumflow.runtime.embedded import read_instance
from datumflow.settings import Settings
from datumflow.storage import FileStore, ObjectStore, open_store
from datumflow.storage.faulty import FaultyStore, parse_faults
from datumflow.storage.retrying import RetryingStore

log = logging.getLogger(__name__)

ORPHAN_GRACE = 8.0
"""Seconds an orphaned function (its `datumflow up` died) has to stop once told to, before it
exits anyway. With its parent alive, the parent keeps its own deadline (`up` kills a child past
it, as Kubernetes does a container)."""

Body = Callable[[Broker, ObjectStore, asyncio.Event], Awaitable[None]]


def resolve(settings: Settings) -> Settings:
    """Fill in the broker and store of the running `datumflow up` when none is named, and the
    credentials of a secured state directory (`up --secure`) when none are given."""
    if settings.nats_url:
        return settings
    home = Path(settings.home)
    instance = read_instance(home)
    if instance is None:
        return settings
    settings = msgspec.structs.replace(
        settings,
        nats_url=instance.nats_url,
        monitor_url=settings.monitor_url or instance.monitor_url,
        storage=settings.storage or instance.storage,
        s3_endpoint=settings.s3_endpoint or instance.s3_endpoint,
        s3_region=settings.s3_region or instance.s3_region,
    )
    made = secure.load(home)
    return secure.apply(settings, made) if made is not None else settings


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
    parent = os.getppid()

    def told_to_stop() -> None:
        stop.set()
        if os.getppid() != parent:
            # `datumflow up` died (its death sent this signal) and nobody will kill us past a
            # deadline: one that waits on a broker that died with it must not linger. What it
            # held is unacked, and comes back to the next one.
            exit_later = threading.Timer(ORPHAN_GRACE, os._exit, args=(1,))
            exit_later.daemon = True
            exit_later.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, told_to_stop)


async def open_function_store(*, settings: Settings, function: str) -> ObjectStore:
    """The object store a function uses: the real one, with retries of the errors that may pass,
    and the faults of `storage_faults` (testing only) between the two."""
    store = await open_store(
        settings.storage_url(), endpoint=settings.s3_endpoint, region=settings.s3_region
    )
    if settings.storage_faults:
        faulty = FaultyStore(
            store,
            spec=parse_faults(settings.storage_faults),
            function=function,
            record_dir=settings.home_path / "faults",
        )
        log.warning("%s: injecting object store faults: %s", function, settings.storage_faults)
        return RetryingStore(faulty, function=function)
    if isinstance(store, FileStore):
        # A worker's puts are fsynced together, before the results that name them go out
        # (functions.worker.reporter); everyone else's at once.
        store.sync_on_flush = function == "worker"
        return store  # a local disk either works or fails for good; keep its fast paths
    return RetryingStore(store, function=function)


async def serve(*, settings: Settings, name: str, body: Body) -> None:
    metrics.install(settings)
    stop = asyncio.Event()
    stop_on_signals(stop)
    log.info("%s: pid %d on %s", name, os.getpid(), socket.gethostname())
    broker = await connect_patiently(settings=settings, name=name)
    function = name.removeprefix("datumflow-").split("-")[0]
    store = await open_function_store(settings=settings, function=function)
    try:
        await body(broker, store, stop)
    finally:
        await store.close()
        await broker.close()
