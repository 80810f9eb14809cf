"""Running a scenario through multiprocessing.Pool: no broker, no delivery guarantee, the floor.

The pool is started (and every process warmed up) before the clock starts; `map` is what a user
would type, with its default chunking.
"""

from __future__ import annotations

import multiprocessing
import time

from bench import work
from bench.scenarios import Measure, Scenario


def run(scenario: Scenario) -> Measure:
    function = work.KINDS[scenario.kind]
    # spawn: the bench process has threads (asyncio's executor), which fork does not mix with.
    context = multiprocessing.get_context("spawn")
    with context.Pool(scenario.workers) as pool:
        pool.map(work.noop, range(scenario.workers * 4))
        paths = [f"/in/f{i:07d}" for i in range(scenario.datums)]
        started = time.time()
        pool.map(function, paths)
        seconds = time.time() - started
    return Measure(system="pool", scenario=scenario.key, datums=scenario.datums, seconds=seconds)
