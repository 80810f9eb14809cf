"""Fetching a worker's next datum set before the set in hand is done.

An in-process set runs on the user-code thread without a round trip per datum; between two sets
there was one, the fetch, during which the thread had nothing to do (and on a busy machine the
broker's answer can take several milliseconds to come). `Ahead` fetches the next set when the
thread starts the last datum of the current one: only datums already waiting (one request, no
waiting for more), so a worker takes at most one set it cannot start at once, and only while
its last datum runs. The set fetched is heartbeated from then on, and handed back at once if
the worker stops before starting it.

A command's set fetches its next one later, once its last datum's process has ended, while that
datum's output is stored and its result reported: a process that kills its worker takes no
fetched set down with it, whose datums would count that death as an attempt of theirs. Only a
worker that dies in those milliseconds (the kernel's OOM killer, a lost node) does that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from datumflow.broker.connection import Broker
from datumflow.broker.pull import Puller
from datumflow.broker.set_parts import SetParts
from datumflow.broker.settle import Msg
from datumflow.functions.worker import handback
from datumflow.functions.worker.batch import Heartbeat

log = logging.getLogger(__name__)


class Ahead:
    """At most one set fetched ahead: `start` it from the loop; `next` is the set to work on."""

    def __init__(
        self,
        *,
        broker: Broker,
        puller: Puller,
        heartbeat: Heartbeat,
        size: Callable[[], Awaitable[int]],
        parts: SetParts,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.broker = broker
        self.puller = puller
        self.parts = parts
        """Set messages come out of a fetch as their datums (broker.set_parts)."""
        self.heartbeat = heartbeat
        self.size = size
        self.stop = stop
        """Set: nothing more is fetched ahead. None: not working yet."""
        self._task: asyncio.Task[list[Msg]] | None = None

    def start(self) -> None:
        """The set in hand is on its last datum: fetch the next one now, unless stopping."""
        if self._task is None and self.stop is not None and not self.stop.is_set():
            self._task = asyncio.create_task(self._fetch())

    async def _fetch(self) -> list[Msg]:
        msgs = self.parts.split(await self.puller.fetch(batch=await self.size(), wait=0))
        if msgs:
            self.heartbeat.hold(msgs)
        return msgs

    async def next(self, *, wait: float) -> list[Msg]:
        """The set fetched ahead if there is one, else a set fetched now ([] if none came within
        `wait` seconds)."""
        msgs = await self.take()
        if not msgs:
            msgs = self.parts.split(await self.puller.fetch(batch=await self.size(), wait=wait))
        return msgs

    async def take(self) -> list[Msg]:
        """The set fetched ahead ([] if none was, or none was waiting)."""
        task, self._task = self._task, None
        if task is None:
            return []
        try:
            return await task
        except Exception:
            log.exception("worker: fetching the next datum set ahead failed")
            return []

    async def hand_back(self) -> None:
        """Stopping: a set fetched ahead and never started goes back at once, no attempt."""
        msgs = await self.take()
        for msg in msgs:
            self.heartbeat.release(msg)
        await handback.hand_back(self.broker, msgs)
