"""Reporting a worker's datum results and acking their datums, without a round trip per datum.

The results a worker hands over in one step of its event loop (the user-code thread reports tiny
datums in groups) travel together: one message per job (messages.DatumResults), or the plain
DatumResult when there is only one. Before they go, the objects they name are made durable
(`ObjectStore.flush`: one group of fsyncs for every result sent together, with the local store).
Messages go out in a window (datumflow.broker.outbox), and each datum is acked once the stream has
stored its result (invariant 4), in publication order. A datum whose result could not be stored
is nak'ed, to be done again; the committer counts the first result of each datum, so a result sent
twice is counted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging

import msgspec

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.messages import DatumResult, DatumResults
from datumflow.broker.outbox import Outbox
from datumflow.broker.settle import Msg, settle
from datumflow.errors import BrokerError
from datumflow.functions.worker.batch import Heartbeat
from datumflow.storage.base import ObjectStore

log = logging.getLogger(__name__)

MAX_RESULTS = 256
"""Results in one message at most."""
MAX_BYTES = 256 << 10
"""A message of results is split past this size: well under the broker's 1 MiB limit."""

Report = tuple[Msg, DatumResult]


class Reporter:
    def __init__(
        self,
        broker: Broker,
        heartbeat: Heartbeat,
        *,
        store: ObjectStore,
        window: int = 512,
        timeout: float = 10.0,
    ) -> None:
        self.broker = broker
        self.store = store
        self.outbox = Outbox(broker, window=window, timeout=timeout)
        self.heartbeat = heartbeat
        self._pending: list[Report] = []
        self._sending: asyncio.Task[None] | None = None

    def report(self, msg: Msg, result: DatumResult) -> None:
        """Hand over the result of `msg`'s datum; it is sent with the others handed over in this
        step of the event loop, and `msg` is acked once it is stored."""
        self._pending.append((msg, result))
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send())

    async def _send(self) -> None:
        while self._pending:
            reports, self._pending = self._pending, []
            try:
                # Every object these results name was put before they were handed over.
                await self.store.flush()
            except Exception:
                log.exception(
                    "storing the outputs of %d datums failed; they are handed back", len(reports)
                )
                for msg, _ in reports:
                    await self._settle(msg, stored=False)
                continue
            for group in _groups(reports):
                try:
                    await self._publish(group)
                except Exception:
                    log.exception(
                        "reporting %d datum results; their datums are handed back", len(group)
                    )
                    for msg, _ in group:
                        await self._settle(msg, stored=False)

    async def _publish(self, group: list[Report]) -> None:
        first = group[0][1]
        if len(group) == 1:
            subject = subjects.result(first.pipeline, first.job)
            payload = msgspec.json.encode(first)
            msg_id = f"{first.job}:{first.datum}:{first.state}"
        else:
            results = [r for _, r in group]
            payload = msgspec.json.encode(
                DatumResults(pipeline=first.pipeline, job=first.job, results=results)
            )
            if len(payload) > MAX_BYTES:
                half = len(group) // 2
                await self._publish(group[:half])
                await self._publish(group[half:])
                return
            subject = subjects.results(first.pipeline, first.job)
            # The same results sent again (a retry) carry the same id: the stream keeps one.
            digest = hashlib.sha256(",".join(f"{r.datum}:{r.state}" for r in results).encode())
            msg_id = f"{first.job}:set:{digest.hexdigest()[:32]}"
        msgs = [m for m, _ in group]

        async def then(stored: bool) -> None:
            for msg in msgs:
                await self._settle(msg, stored=stored)

        await self.outbox.publish(subject, payload, msg_id=msg_id, then=then)

    async def _settle(self, msg: Msg, *, stored: bool) -> None:
        try:
            # Not stored: done again, soon (the committer counts the first result of a datum).
            outcome = None if stored else BrokerError("the datum's result was not stored")
            await settle(self.broker, function="worker", msgs=msg, outcome=outcome)
        finally:
            self.heartbeat.release(msg)

    async def close(self) -> None:
        """Send what was handed over, settle what can be, and let go of the outbox."""
        if self._sending is not None:
            # Bounded: with the broker gone, what is not sent comes back to other workers anyway.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._sending, self.outbox.timeout * 2)
        await self.outbox.close()


def _groups(reports: list[Report]) -> list[list[Report]]:
    """Consecutive results of one job, at most MAX_RESULTS together (a worker's set is one job's,
    but the next set may be another job's)."""
    groups: list[list[Report]] = []
    for report in reports:
        last = groups[-1] if groups else None
        result = report[1]
        if (
            last is None
            or len(last) >= MAX_RESULTS
            or (last[0][1].pipeline, last[0][1].job) != (result.pipeline, result.job)
        ):
            groups.append([report])
        else:
            last.append(report)
    return groups
