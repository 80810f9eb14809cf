"""Workers over time: the console samples each pipeline's lag and its desired and running workers
every few seconds into a bounded ring, which the workers chart draws.

Where the numbers come from:
- lag: the pipeline's worker consumer, read from JetStream (num_pending + num_ack_pending, the
  figure KEDA and the local scaler scale on), so it is right wherever the console runs;
- desired and running: the local scaler's own decision (`<home>/status.json`, written by
  `datumflow up`) when the console runs beside it; elsewhere (a cluster, where KEDA scales) desired
  is what KEDA's rule (datumflow.scaling, the same Scaler) makes of that lag, and running is not
  known to the console (null: it reads no Kubernetes API).

The ring lives in the console's memory: it starts empty when the console starts and keeps the last
RING_SAMPLES samples (30 minutes at the default period).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgspec

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.kv import Records
from datumflow.broker.lag import consumer_lag
from datumflow.broker.records import PipelineInfo
from datumflow.errors import BrokerError
from datumflow.runtime.status import read_status
from datumflow.scaling import Scaler, ScalingError, params_for

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 2.0
RING_SAMPLES = 900


class Sample(msgspec.Struct, kw_only=True, omit_defaults=False):
    time: float
    lag: int | None
    desired: int | None
    running: int | None
    state: str = ""
    source: str = "console"
    """"local": the local scaler's decision; "console": lag read by the console, desired by
    KEDA's rule."""


class Sampler:
    """Samples every pipeline's lag and workers, keeps a ring per pipeline."""

    def __init__(
        self, *, broker: Broker, home: Path | None, period: float = SAMPLE_SECONDS
    ) -> None:
        self.broker = broker
        self.home = home
        self.period = period
        self.records = Records(broker, bucket=subjects.PIPELINES_BUCKET, type=PipelineInfo)
        self.rings: dict[str, deque[Sample]] = {}
        self._scalers: dict[str, tuple[int, Scaler | None]] = {}

    def latest(self) -> dict[str, dict[str, Any]]:
        """Each pipeline's newest sample, as the DAG shows it."""
        return {name: msgspec.to_builtins(ring[-1]) for name, ring in self.rings.items() if ring}

    def series(self, pipeline: str = "") -> dict[str, list[dict[str, Any]]]:
        names = [pipeline] if pipeline else sorted(self.rings)
        return {n: [msgspec.to_builtins(s) for s in self.rings.get(n, ())] for n in names}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sample()
            except BrokerError as exc:
                log.warning("console: sampling workers: %s", exc)
            except Exception:  # a record it cannot read: the chart pauses, the console serves on
                log.exception("console: sampling workers failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.period)

    async def sample(self) -> None:
        """One sample of every pipeline; pipelines that are gone are forgotten."""
        infos = {p.name: p for p in await self.records.all()}
        local = read_status(self.home) if self.home is not None else {}
        now = time.time()
        for name in list(self.rings):
            if name not in infos:
                del self.rings[name]
                self._scalers.pop(name, None)
        for name, info in infos.items():
            ring = self.rings.setdefault(name, deque(maxlen=RING_SAMPLES))
            ring.append(await self._sample(info, local.get(name), now))

    async def _sample(self, info: PipelineInfo, local: dict[str, Any] | None, now: float) -> Sample:
        if local is not None:
            return Sample(
                time=now,
                lag=local.get("lag"),
                desired=local.get("desired"),
                running=local.get("workers"),
                state=str(local.get("state", "")),
                source="local",
            )
        lag = await consumer_lag(
            self.broker, stream=subjects.DATUMS_STREAM, consumer=subjects.worker_consumer(info.name)
        )
        scaler = self._scaler(info)
        desired = scaler.desired(lag, time.monotonic()) if scaler is not None else None
        return Sample(time=now, lag=lag, desired=desired, running=None)

    def _scaler(self, info: PipelineInfo) -> Scaler | None:
        version, scaler = self._scalers.get(info.name, (-1, None))
        if version != info.version:
            try:
                scaler = Scaler(params_for(info.spec, nodes=1, place="kubernetes"))
            except ScalingError:
                scaler = None
            self._scalers[info.name] = (info.version, scaler)
        return scaler
