"""One job at a time per pipeline: the planner waits for the previous job to end, moves the
pipeline's job head only forward, and skips against the last successful job's datum index.

Two planners may plan a pipeline's events (they share its consumer, one event in flight at a
time), and one paused past the consumer's ack_wait may wake after the other planned its job and
the next: so the head never goes back to a job of an earlier commit event (`JobInfo.seq`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import msgspec

from datumflow.broker.records import DatumIndexEntry, JobHead, JobInfo
from datumflow.pfs.pipelines import Pipelines, job_key
from datumflow.storage.base import ObjectStore

log = logging.getLogger(__name__)
_replace = msgspec.structs.replace

POLL = 0.1
"""Seconds between two looks at the previous job while it runs."""


async def wait_for_previous(
    pipelines: Pipelines, *, name: str, job_id: str, beat: Callable[[], Awaitable[None]]
) -> JobInfo | None:
    """Until the pipeline's previous job has ended (calling `beat` meanwhile, to keep the event);
    that job, or None if there is none (or it is `job_id` itself)."""
    while True:
        head = await pipelines.heads.find(name)
        if head is None or not head.last_job or head.last_job == job_id:
            return None
        previous = await pipelines.jobs.find(job_key(name, head.last_job))
        if previous is None or previous.done:
            return previous
        await beat()
        await asyncio.sleep(POLL)


async def set_head(pipelines: Pipelines, *, name: str, job_id: str, seq: int) -> None:
    """Make `job_id` (of the commit event `seq`) the pipeline's newest job, unless the head is
    already a job of a later event."""
    head = await pipelines.heads.find(name)
    if head is None:
        await pipelines.heads.create(name, JobHead(pipeline=name))
    elif head.last_job and head.last_job != job_id:
        last = await pipelines.jobs.find(job_key(name, head.last_job))
        if last is not None and last.seq > seq:
            log.warning("planner: %s@%s is older than the head job; not moving it", name, job_id)
            return
    await pipelines.heads.update(
        name, lambda h: None if h.last_job == job_id else _replace(h, last_job=job_id)
    )


async def previous_datums(
    pipelines: Pipelines, store: ObjectStore, *, name: str, ended: JobInfo | None
) -> dict[str, DatumIndexEntry]:
    """The datum index of the last successful job: `ended` (the previous job) if it succeeded —
    the committer moves the head's `last_success` only after the job's record says so, so the
    head may not say it yet — else the head's."""
    last = ended if ended is not None and ended.state == "success" else None
    if last is None:
        head = await pipelines.heads.find(name)
        if head is None or not head.last_success:
            return {}
        last = await pipelines.jobs.find(job_key(name, head.last_success))
    if last is None or not last.datums:
        return {}
    data = await store.get_bytes(last.datums)
    entries = msgspec.json.decode(data, type=list[DatumIndexEntry])
    return {e.datum: e for e in entries}
