"""What the worker SIGKILL storm showed about the supervisor's restart backoff.

A child in a crash loop should wait longer and longer before it is started again; a child that ran
fine for a while and was then killed once (an OOM kill, a node hiccup, a chaos test) should come
back at once, however many times it died before.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from datumflow.runtime.child import Child

pytestmark = pytest.mark.asyncio


async def _die(child: Child) -> None:
    assert child.process is not None
    child.process.kill()
    await child.process.wait()


async def test_a_crash_loop_backs_off(tmp_path: Path) -> None:
    child = Child("w", ["sleep", "60"], env=dict(os.environ), log_file=tmp_path / "w.log")
    waits = []
    for _ in range(4):
        await child.start()
        await _die(child)
        await child.keep_alive()  # sees the death, schedules the restart
        waits.append(child.next_start - time.monotonic())
        child.next_start = 0.0
    assert waits == sorted(waits) and waits[-1] > waits[0] * 4


async def test_a_child_that_ran_fine_comes_back_at_once(tmp_path: Path) -> None:
    child = Child("w", ["sleep", "60"], env=dict(os.environ), log_file=tmp_path / "w.log")
    for _ in range(8):  # an early crash loop
        await child.start()
        await _die(child)
        await child.keep_alive()
        child.next_start = 0.0
    await child.start()
    await _die(child)
    await child.keep_alive()
    crash_loop_wait = child.next_start - time.monotonic()
    assert crash_loop_wait > 5, f"a crash-looping child waits only {crash_loop_wait:.1f}s"
    child.next_start = 0.0
    await child.start()
    # Then a healthy run: one that started `healthy_after` seconds ago, as the child's clock reads
    # it (its start time), rather than a real wait that a busy machine could stretch or shrink.
    child.started_at -= Child.healthy_after
    await _die(child)
    await child.keep_alive()
    wait = child.next_start - time.monotonic()
    assert wait < 1.0, f"a child that ran fine waits {wait:.1f}s to come back"
