"""One attempt at a datum: the result it comes to (or Retry), and storing what it wrote.

Both kinds of user code, commands (functions.worker.commands) and in-process functions
(functions.worker.inprocess), end here: a failed attempt with tries left raises Retry, and the
worker hands the datum back; anything else becomes a DatumResult.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datumflow.broker.messages import DatumResult, DatumState, DatumStats, DatumTask, listed
from datumflow.errors import PermanentError
from datumflow.functions.worker.outputs import collect_outputs
from datumflow.pfs import manifest
from datumflow.storage.base import ObjectStore

MakeResult = Callable[..., DatumResult]


class Retry(Exception):
    """This attempt failed and the datum has tries left: hand it back."""


def result_maker(task: DatumTask, attempt: int) -> MakeResult:
    """`make(state, **fields)`: the result of this attempt at `task`."""
    files = listed([f for i in task.inputs for f in i.files])

    def make(state: DatumState, **fields: Any) -> DatumResult:
        return DatumResult(
            pipeline=task.pipeline,
            job=task.job,
            datum=task.datum,
            hash=task.hash,
            state=state,
            files=files,
            attempts=attempt,
            **fields,
        )

    return make


async def upload(
    store: ObjectStore, out: Path, stats: DatumStats, make: MakeResult, *, logs: str = ""
) -> DatumResult:
    """Store every file under `out` and its manifest: the datum's success (or why it failed)."""
    t0 = time.monotonic()
    try:
        outputs = await collect_outputs(store, out)
    except PermanentError as exc:
        return make("failed", error=str(exc), logs=logs, stats=stats)
    stats.upload_time = time.monotonic() - t0
    stats.upload_bytes = sum(f.size for f in outputs)
    output = await manifest.write(store, outputs)
    return make("success", output=output, logs=logs, stats=stats)
