"""The committer's reading of every pipeline's backlog for the metrics: pending, ack pending and
redelivered datums of its workers' consumer, every few seconds.

The committer runs wherever datumflow runs (under `datumflow up` and in a cluster alike) and stays
when workers scale to zero, so the lag of a pipeline with no worker is still seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.lag import consumer_backlog
from datumflow.errors import BrokerError
from datumflow.metrics import current
from datumflow.pfs.pipelines import Pipelines

log = logging.getLogger(__name__)

EVERY = 5.0
"""Seconds between two readings (Prometheus scrapes every 15 s by default)."""


async def watch_backlogs(
    *, broker: Broker, pipelines: Pipelines, stop: asyncio.Event, every: float = EVERY
) -> None:
    metrics = current()
    if metrics is None:
        return
    known: set[str] = set()
    while not stop.is_set():
        try:
            names = {info.name for info in await pipelines.list()}
            for name in names:
                backlog = await consumer_backlog(
                    broker, stream=subjects.DATUMS_STREAM, consumer=subjects.worker_consumer(name)
                )
                metrics.pending.labels(pipeline=name).set(backlog.pending)
                metrics.ack_pending.labels(pipeline=name).set(backlog.ack_pending)
                metrics.redelivered.labels(pipeline=name).set(backlog.redelivered)
            for gone in known - names:
                for gauge in (metrics.pending, metrics.ack_pending, metrics.redelivered):
                    gauge.labels(pipeline=gone).set(0)  # what `up` serves keeps the last value
                    with contextlib.suppress(KeyError):
                        gauge.remove(gone)
            known = names
        except BrokerError as exc:
            log.warning("committer: reading the pipelines' backlogs: %s", exc)
        except Exception:
            log.exception("committer: reading the pipelines' backlogs")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
