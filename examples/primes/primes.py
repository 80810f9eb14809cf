"""A "model" loaded once per worker and used by every datum: the smallest prime factor of every
number below LIMIT.

datumflow imports this module once in each worker process, then calls `classify` for every datum
that worker runs, in the worker itself, with no process per datum (`transform.function`, see
docs/transform.md). Whatever the module builds at import (this table here, a trained model or a
connection elsewhere) is built once per worker, however many datums follow.

Each datum's output also records which worker ran it, when that worker built the table and how
many times it did, so that the loading once per worker shows in the output commit.
"""

import json
import os
import time
from array import array
from pathlib import Path

LIMIT = 1_000_000
LOADS = 0
SERVED = 0


def _smallest_factors(limit: int) -> array:
    """factor[n]: the smallest prime dividing n, for 2 <= n < limit. Millions of steps of pure
    Python (a third of a second here): too slow to redo for every datum."""
    factor = array("L", range(limit))
    for p in range(2, int(limit**0.5) + 1):
        if factor[p] == p:  # no smaller prime divides p: p is prime
            for multiple in range(p * p, limit, p):
                if factor[multiple] == multiple:
                    factor[multiple] = p
    return factor


def _load() -> array:
    global LOADS
    LOADS += 1
    return _smallest_factors(LIMIT)


_started = time.time()
TABLE = _load()
LOADED_AT = time.time()
LOAD_SECONDS = round(LOADED_AT - _started, 3)
print(f"primes: built the table below {LIMIT:,} in {LOAD_SECONDS}s (pid {os.getpid()})")


def describe(n: int) -> str:
    if not 0 <= n < LIMIT:
        raise ValueError(f"{n} is outside the table (0 to {LIMIT - 1})")
    if n < 2:
        return f"{n} is neither prime nor composite"
    factors = []
    while n > 1:
        factors.append(TABLE[n])
        n //= TABLE[n]
    if len(factors) == 1:
        return f"{factors[0]} is prime"
    product = 1
    for f in factors:
        product *= f
    return f"{product} = {' x '.join(map(str, factors))}"


def classify(inputs: dict[str, Path], out: Path) -> None:
    """One line per number of the datum's file: prime, or its prime factors."""
    global SERVED
    SERVED += 1
    source = inputs["numbers"]
    lines = [describe(int(word)) + "\n" for word in source.read_text().split()]
    (out / source.name).write_text("".join(lines))
    worker = {
        "pid": os.getpid(),
        "loaded_at": LOADED_AT,
        "load_seconds": LOAD_SECONDS,
        "loads": LOADS,
        "datum_in_this_worker": SERVED,
    }
    (out / "workers").mkdir()
    (out / "workers" / f"{source.name}.json").write_text(json.dumps(worker) + "\n")
