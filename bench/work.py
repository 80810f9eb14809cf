"""The work itself, identical for every system: a no-op, 10 ms of CPU, 100 ms of sleep.

Each system calls the same three functions; only the wrapping differs (a Celery task, a Pool map,
a datumflow in-process transform with the `(inputs, out)` contract of docs/transform.md).
"""

from __future__ import annotations

import time
from pathlib import Path

CPU_SECONDS = 0.010
SLEEP_SECONDS = 0.100
LONG_SECONDS = 0.200
"""bench.profile's `long` datums: a wait long enough that what costs CPU per wall second, not
per datum, shows."""


def noop(_: object = None) -> None:
    return None


def cpu(_: object = None) -> None:
    """Burn CPU_SECONDS of this thread's CPU time: the same work however busy the machine is."""
    end = time.thread_time() + CPU_SECONDS
    while time.thread_time() < end:
        pass


def nap(_: object = None) -> None:
    time.sleep(SLEEP_SECONDS)


KINDS = {"noop": noop, "cpu": cpu, "sleep": nap}


# datumflow in-process transforms: transform.function = "bench.work:df_noop", ...


def df_noop(inputs: dict[str, Path], out: Path) -> None:
    noop()


def df_cpu(inputs: dict[str, Path], out: Path) -> None:
    cpu()


def df_sleep(inputs: dict[str, Path], out: Path) -> None:
    nap()


def df_long(inputs: dict[str, Path], out: Path) -> None:
    time.sleep(LONG_SECONDS)
