"""The planner's side of a rerun: a `RerunRequest` → a new job on the job's input commits that
skips against the job's own datum index, so only its failed datums run again.

The request comes through the pipeline's planner consumer, after the commit events before it: if
one of them started a newer job, the request is stale and is dropped (the requester, `pfs/reruns.py`,
says so to the user). Asked twice, it plans one job (its id is derived from the job rerun). A
request names the job's creation time too: read again after the pipeline was deleted and made
anew, it does not rerun the new pipeline's job of the same id.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from datumflow.broker.consumer import decode
from datumflow.broker.messages import RerunRequest
from datumflow.broker.records import CommitInfo
from datumflow.broker.settle import Msg
from datumflow.errors import NotFound, PermanentError
from datumflow.pfs.pipelines import job_key
from datumflow.pfs.reruns import datum_index, rerun_job_id
from datumflow.spec import input_leaves

if TYPE_CHECKING:
    from datumflow.functions.planner import Planner

log = logging.getLogger(__name__)


async def plan_rerun(planner: Planner, name: str, msg: Msg) -> None:
    request = decode(msg.data, RerunRequest, what="rerun request")
    if request.pipeline != name:
        raise PermanentError(f"a rerun request for pipeline {request.pipeline} on {msg.subject}")
    pipelines = planner.pipelines
    try:
        info = await pipelines.get(name)
    except NotFound:
        return  # deleted since
    old = await pipelines.jobs.find(job_key(name, request.job))
    if old is None or old.created != request.created:
        log.warning("rerun of %s@%s dropped: no such job (any more)", name, request.job)
        return
    new_job = rerun_job_id(name, info.version, old.id)
    head = await pipelines.heads.find(name)
    newest = head.last_job if head is not None else ""
    if not old.done or newest not in (old.id, new_job):
        # A commit event before the request started a newer job (or this is a request read
        # again after the pipeline was updated): rerunning the old job now would put its output
        # over the newer one's.
        log.warning("rerun of %s@%s dropped: %s@%s is newer", name, old.id, name, newest)
        return
    commits: list[CommitInfo | None] = []
    for leaf in input_leaves(info.spec.input):
        ref = next(
            (c for c in old.input_commits if c.repo == leaf.repo and c.branch in ("", leaf.branch)),
            None,
        )
        commit = (
            None if ref is None else await planner.repos.commits.find(f"{ref.repo}.{ref.commit}")
        )
        if ref is not None and commit is None:
            log.warning(
                "rerun of %s@%s dropped: commit %s@%s is gone", name, old.id, ref.repo, ref.commit
            )
            return
        commits.append(commit)
    previous = await datum_index(planner.store, old)
    await planner.plan_job(info, msg, new_job, commits, rerun_of=old.id, previous=previous)
    log.info("rerun of %s@%s planned as %s@%s", name, old.id, name, new_job)
