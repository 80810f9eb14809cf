"""Printing the user code's output for `datumflow logs`: the kept logs of finished datums, and
the chunks workers publish live as the user code writes them."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from datumflow.broker import subjects
from datumflow.broker.connection import Subscription
from datumflow.broker.settle import Msg
from datumflow.cli.context import Api
from datumflow.errors import NotFound
from datumflow.pfs import results


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


async def print_stored_logs(
    api: Api, pipeline: str, job: str, datum: str, *, strict: bool
) -> set[str]:
    """Print the kept logs of the job's datums (in the order they finished); their ids."""
    await api.pipelines.get_job(pipeline, job)
    done = results.first_results(await results.replay(api.broker, pipeline, job))
    chosen = [r for r in done.values() if r.datum.startswith(datum)]
    if datum and strict and not chosen:
        raise NotFound(
            f"no datum {datum} has finished in job {pipeline}@{job}; `datumflow list datum"
            f" {pipeline}@{job}` shows its datums, `logs -f` follows running ones"
        )
    for result in chosen:
        if result.logs:
            _write(await api.store.get_bytes(result.logs))
    return {r.datum for r in chosen}


class LiveLogs:
    """Output chunks the workers publish as the user code writes them (core NATS: nothing is
    kept, so we subscribe before reading the stored logs, and drop what those already showed)."""

    def __init__(self, api: Api, pipeline: str, job: str, datum: str) -> None:
        self.api = api
        self.pipeline = pipeline
        self.job = job
        self.datum = datum
        self.chunks: asyncio.Queue[Msg] = asyncio.Queue()
        self.stop = asyncio.Event()
        self.sub: Subscription | None = None

    async def start(self) -> None:
        subject = subjects.logs(self.pipeline, self.job or "*", "*")
        self.sub = await self.api.broker.subscribe(subject, cb=self.chunks.put)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)

    async def follow(self, *, skip: set[str], stored_job: str) -> None:
        ended = asyncio.create_task(self._job_end()) if self.job else None
        try:
            while not self.stop.is_set():
                try:
                    msg = await asyncio.wait_for(self.chunks.get(), timeout=0.25)
                except TimeoutError:
                    continue
                self._show(msg, skip, stored_job)
            while not self.chunks.empty():
                self._show(self.chunks.get_nowait(), skip, stored_job)
        finally:
            if ended is not None:
                ended.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ended

    def _show(self, msg: Msg, skip: set[str], stored_job: str) -> None:
        _, _, _, job, datum = (msg.subject.split(".") + [""] * 5)[:5]
        if not datum.startswith(self.datum):
            return
        if job == stored_job and datum in skip:
            return  # its whole log was printed from the store already
        _write(msg.data)

    async def _job_end(self) -> None:
        """With -j, stop once the job has ended and its last chunks have had time to arrive."""
        while True:
            info = await self.api.pipelines.get_job(self.pipeline, self.job)
            if info.done:
                await asyncio.sleep(0.5)
                self.stop.set()
                return
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
