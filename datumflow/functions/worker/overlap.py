"""A set of command datums, overlapped: while one datum's user code runs, the next one is
downloaded and the last one's output uploaded and reported, so that user code never waits on the
store or the broker between two datums.

User code still runs one datum at a time (functions.worker.commands holds the turn); each datum
runs with an event of its own in `commands.TURN`, which it sets once its user code has the turn. At most three datums are in hand: one
uploading, one running, one downloading. Stopping, a datum whose user code has not had its turn
is cancelled: its message goes back with the rest of the set.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any

from datumflow.broker.messages import DatumTask
from datumflow.broker.records import PipelineInfo
from datumflow.broker.settle import Msg
from datumflow.functions.worker.commands import TURN, Commands

IN_HAND = 3

One = Callable[[Msg, DatumTask], Coroutine[Any, Any, None]]
"""One datum, start to end."""


def overlaps(info: PipelineInfo, commands: Commands) -> bool:
    """Whether a set's datums may overlap: a command per datum, each with a layout of its own."""
    transform = info.spec.transform
    return not transform.function and not transform.datum_batching and commands.overlaps


def adaptive_sets(info: PipelineInfo) -> bool:
    """Whether a worker's sets hold a fraction of a second of work (functions.worker.batch): a
    function's and a batching session's. A command's sets stay single datums unless the spec asks
    otherwise (`datum_set_spec`): a datum whose process kills its worker would take with it the
    result of the datum before it, still being stored, and the datums after it in its set would
    count that death as an attempt of theirs."""
    transform = info.spec.transform
    return bool(transform.function) or transform.datum_batching


async def overlapped(items: list[tuple[Msg, DatumTask]], one: One, stop: asyncio.Event) -> None:
    """Every datum of `items` through `one`, overlapped; the first error of any is raised once
    the others are cancelled."""
    flight: dict[asyncio.Task[None], asyncio.Event] = {}
    try:
        for msg, task in items:
            if stop.is_set():
                break
            turn = asyncio.Event()
            context = contextvars.copy_context()
            context.run(TURN.set, turn)
            flight[asyncio.get_running_loop().create_task(one(msg, task), context=context)] = turn
            # The next datum starts once this one's user code runs (or this one is done).
            waiting = asyncio.ensure_future(turn.wait())
            await asyncio.wait({waiting, *flight}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            _forget_done(flight)
            while len(flight) >= IN_HAND:
                await asyncio.wait(flight, return_when=asyncio.FIRST_COMPLETED)
                _forget_done(flight)
        while flight:
            if stop.is_set():
                for job, turn in flight.items():
                    if not turn.is_set():
                        job.cancel()
            await asyncio.wait(flight, return_when=asyncio.FIRST_COMPLETED)
            _forget_done(flight)
    finally:
        for job in flight:
            job.cancel()
        if flight:
            await asyncio.wait(flight)


def _forget_done(flight: dict[asyncio.Task[None], asyncio.Event]) -> None:
    """Drop the finished datums from `flight`, raising the error of one that failed."""
    for job in [j for j in flight if j.done()]:
        del flight[job]
        if not job.cancelled():
            error = job.exception()
            if error is not None:
                raise error
