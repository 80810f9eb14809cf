"""Pipeline events for the controller: a watch on the pipelines bucket that survives broker restarts.

`pipeline_events` yields (name, spec) when a pipeline is created or updated and (name, None) when it
is deleted. It is level-triggered underneath: every `resync_interval` seconds, and after any broker
error, the watch is opened again and the bucket's current contents are compared with what was last
reported, so an update or a delete that happened while the watch was deaf (a broker restart, nats.py's
push consumers that stop receiving after one) is still reported, once. Reporting again what is
already reported is harmless anyway: the controller's server-side apply and delete are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import msgspec

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.kv import watch
from datumflow.broker.records import PipelineInfo
from datumflow.errors import BrokerError
from datumflow.spec import PipelineSpec

log = logging.getLogger(__name__)

PipelineEvent = tuple[str, PipelineSpec | None]

# A watch is reopened this often even when it seems healthy: the cheapest proof that it still is.
DEFAULT_RESYNC_INTERVAL = 30.0
_MAX_BACKOFF = 5.0
_DELETED = -1


async def pipeline_events(
    broker: Broker,
    *,
    stop: asyncio.Event,
    resync_interval: float = DEFAULT_RESYNC_INTERVAL,
) -> AsyncIterator[PipelineEvent]:
    """Pipeline created/updated → (name, spec); deleted → (name, None); until `stop` is set."""
    # name → KV revision last reported (_DELETED once its delete was reported).
    reported: dict[str, int] = {}
    backoff = 0.2
    while not stop.is_set():
        try:
            async for event in _one_watch(broker, reported, stop=stop, seconds=resync_interval):
                yield event
            backoff = 0.2
        except BrokerError as exc:
            log.warning("watching pipelines: %s; watching again in %.1fs", exc, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)


async def _one_watch(
    broker: Broker, reported: dict[str, int], *, stop: asyncio.Event, seconds: float
) -> AsyncIterator[PipelineEvent]:
    """One watch: the current contents, then the changes, for `seconds` or until `stop`."""
    watcher = await watch(broker, subjects.PIPELINES_BUCKET)
    stopping = asyncio.create_task(stop.wait())
    try:
        present: set[str] = set()
        snapshot = True  # until the watcher's None marker: the bucket as it is now
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            update = asyncio.ensure_future(watcher.next(timeout=left))
            await asyncio.wait({update, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not update.done():
                update.cancel()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await update
                return
            try:
                entry = update.result()
            except TimeoutError:
                return
            if entry is None:
                if snapshot:
                    snapshot = False
                    # Pipelines reported earlier that are not in the bucket any more were deleted
                    # (and their delete markers since purged) while we were not watching.
                    for name in sorted(n for n, r in reported.items() if r != _DELETED):
                        if name not in present:
                            reported[name] = _DELETED
                            yield name, None
                continue
            name = entry.key
            present.add(name)
            if entry.deleted or not entry.value:
                if reported.get(name) != _DELETED:
                    reported[name] = _DELETED
                    yield name, None
                continue
            if reported.get(name) == entry.revision:
                continue
            reported[name] = entry.revision
            try:
                info = msgspec.json.decode(entry.value, type=PipelineInfo)
            except msgspec.DecodeError as exc:
                # Written by something that is not datumflow (or a newer one): nothing to apply;
                # remembered by revision, so it is logged once, not at every resync.
                log.error("pipeline record %r does not decode, ignoring it: %s", name, exc)
                continue
            yield name, info.spec
    finally:
        stopping.cancel()
        await watcher.stop()
