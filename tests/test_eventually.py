"""tests.helpers.eventually, the wait every test rests on: it returns once its condition holds,
fails at its deadline, and ends when its task is cancelled, also when the cancellation was
swallowed inside the condition (as Python 3.11's asyncio.wait_for does when the call it waits for
is already done: a long fault run waited forever on a sampler that missed its cancel that way)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from tests.helpers import cancel_requested, eventually

pytestmark = pytest.mark.asyncio


async def _cancelled_once_done(task_box: list[asyncio.Task[Any]]) -> bool:
    """A condition that never holds, through which its own task's cancel is lost as wait_for
    loses it on 3.11: the awaited future completes and the task is cancelled in the same turn."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool] = loop.create_future()

    def finish_then_cancel() -> None:
        done.set_result(False)
        task_box[0].cancel()

    loop.call_soon(finish_then_cancel)
    try:
        return await asyncio.wait_for(done, timeout=5)
    except asyncio.CancelledError:  # 3.12 and later deliver it; swallow it the way 3.11 does
        return False


async def test_eventually_returns_what_holds_and_fails_at_its_deadline() -> None:
    values = iter(range(100))
    assert await eventually(lambda: next(values), until=lambda n: n >= 3, interval=0) == 3
    with pytest.raises(AssertionError, match=r"timed out after 0\.2s waiting for nothing"):
        await eventually(lambda: False, timeout=0.2, interval=0.05, what="nothing")


async def test_a_cancel_lost_inside_the_condition_still_ends_the_wait() -> None:
    box: list[asyncio.Task[Any]] = []
    checks = 0

    async def condition() -> bool:
        nonlocal checks
        checks += 1
        return await _cancelled_once_done(box)

    task: asyncio.Task[bool] = asyncio.create_task(
        eventually(condition, until=lambda ok: ok, timeout=60, interval=0.01, what="never")
    )
    box.append(task)
    finished, _ = await asyncio.wait({task}, timeout=10)
    assert finished, "the wait ran on after its task was cancelled"
    assert task.cancelled()
    assert checks == 1


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for no longer loses cancels")
async def test_wait_for_does_lose_the_cancel_here() -> None:
    # What the helper guards against, shown on this interpreter: the cancel is not raised, yet
    # the task knows it was asked.
    box: list[asyncio.Task[Any]] = []

    async def body() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()

        def finish_then_cancel() -> None:
            done.set_result(True)
            box[0].cancel()

        loop.call_soon(finish_then_cancel)
        got = await asyncio.wait_for(done, timeout=5)
        return got, cancel_requested()

    task = asyncio.create_task(body())
    box.append(task)
    assert await task == (True, True)


async def test_nothing_is_requested_of_a_task_left_alone() -> None:
    assert not cancel_requested()
