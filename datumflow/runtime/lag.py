"""Where the local scaler reads a pipeline's lag (num_pending + num_ack_pending of its workers'
consumer): nats-server's monitoring endpoint, as KEDA reads it, when one is known; else
JetStream's consumer info, the same figure, for a broker that exposes no monitoring endpoint."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from typing import Any

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.lag import consumer_lag
from datumflow.errors import BrokerError
from datumflow.scaling import lag_from_jsz

log = logging.getLogger(__name__)


class LagReader:
    """Reads the lag of workers' consumers, one tick of the supervisor at a time: the /jsz
    document is fetched once per tick for every pipeline due, consumer info once per pipeline."""

    def __init__(self, *, monitor_url: str, broker: Broker) -> None:
        self.monitor_url = monitor_url
        self.broker = broker
        self._jsz: dict[str, Any] | None = None
        self._jsz_read = False

    def next_tick(self) -> None:
        self._jsz, self._jsz_read = None, False

    async def lag(self, pipeline: str) -> int | None:
        """The pipeline's lag; None when it cannot be read now (logged): keep the workers as
        they are, as KEDA does when its scaler fails, rather than scale on a missing number."""
        consumer = subjects.worker_consumer(pipeline)
        if not self.monitor_url:
            try:
                return await consumer_lag(
                    self.broker, stream=subjects.DATUMS_STREAM, consumer=consumer
                )
            except BrokerError as exc:
                log.warning("reading lag of %s: %s", pipeline, exc)
                return None
        if not self._jsz_read:
            self._jsz, self._jsz_read = await read_jsz(self.monitor_url), True
        if self._jsz is None:
            return None
        # A consumer missing from /jsz (created a moment ago, or deleted) has nothing for
        # workers to do: lag 0, never "the whole stream".
        return lag_from_jsz(self._jsz, stream=subjects.DATUMS_STREAM, consumer=consumer) or 0


async def read_jsz(monitor_url: str) -> dict[str, Any] | None:
    """The /jsz document of the broker's monitoring endpoint; None (logged) when it cannot be read."""
    # Without `config=true`: the names and counts are all the lag needs, and the configs of
    # every stream and consumer made the document several times as large to build and parse.
    url = f"http://{monitor_url}/jsz?acc=$G&consumers=true"
    try:
        return await asyncio.to_thread(_get_json, url)
    except (OSError, ValueError) as exc:
        log.warning("reading lag from %s: %s", url, exc)
        return None


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2) as resp:
        doc = json.loads(resp.read())
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
    return doc
