"""What the console's pages show, read from the broker and the object store through the pfs layer:
the DAG, a pipeline's jobs, a job's datums, a datum's log, a repo's commits and files; and its one
action, rerunning a job's failed datums.

Each view is plain JSON-ready data. The shaping is pure (`dag_view`, `job_view`, `datum_rows`,
`commit_view`), so it is tested without a broker; `Views` does the reading. A job's datums come
from its results in the results stream (`pfs.results`, the same replay `list datum` and the
committer use: the first terminal result of each datum counts) and, once it has finished, its
datum index. A finished job's datums never change, so they are read once and kept.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import msgspec

from datumflow.broker.connection import Broker
from datumflow.broker.messages import DatumResult
from datumflow.broker.records import CommitInfo, DatumIndexEntry, JobInfo, PipelineInfo, RepoInfo
from datumflow.console.jobs_cache import JobsCache
from datumflow.errors import NotFound
from datumflow.pfs import results
from datumflow.pfs.pipelines import Pipelines, job_key, newest_first
from datumflow.pfs.repos import Repos
from datumflow.pfs.reruns import NothingToRerun, rerun_failed
from datumflow.spec import input_leaves
from datumflow.storage.base import ObjectStore

LOG_TAIL = 64 * 1024
"""Bytes of a datum's log the console shows: the end, where the error is."""

DATUM_ROWS = 500
"""Datums a job's page lists (failed first, then slowest); the counts cover them all."""

JOBS_LISTED = 50
"""Jobs a pipeline's page lists, newest first."""

COMMITS_LISTED = 100
"""Commits a repo's page lists, newest first."""

FILES_LISTED = 1000
"""Files a commit's view lists."""

KEPT_JOBS = 64
"""Finished jobs whose datums are kept in memory (they never change)..."""

KEPT_RESULTS = 200_000
"""...and their datum results at most, over all of them: a job of a million datums is read again
when shown, not kept (64 of those would hold gigabytes)."""

LIVE_REREAD_PER_RESULT = 1 / 5000
"""Seconds a running job's results are kept before they are read again, per result read: fresh at
every poll for thousands of datums, every 20 s for 100,000."""

FAILED_STATES = ("failed",)


def pipeline_state(info: PipelineInfo, status: dict[str, Any] | None) -> str:
    """The local scaler's word when there is one; else an autoscaled pipeline without workers
    waits in standby, and any other runs (as `list pipeline` says)."""
    if status and status.get("state"):
        return str(status["state"])
    workers = (status or {}).get("running") or 0
    return "standby" if info.spec.autoscaled and not workers else "running"


def dag_view(
    repos: list[RepoInfo],
    pipelines: list[PipelineInfo],
    latest: dict[str, dict[str, Any]],
    last_jobs: dict[str, JobInfo],
) -> dict[str, Any]:
    """Nodes (repos that are no pipeline's output, and pipelines, whose output repo shares their
    name) and edges (an input repo to the pipeline reading it)."""
    outputs = {p.name for p in pipelines}
    nodes: list[dict[str, Any]] = [
        {"id": r.name, "kind": "repo", "description": r.description}
        for r in sorted(repos, key=lambda r: r.name)
        if r.name not in outputs and not r.pipeline
    ]
    edges: list[dict[str, str]] = []
    for info in sorted(pipelines, key=lambda p: p.name):
        status = latest.get(info.name)
        last = last_jobs.get(info.name)
        nodes.append(
            {
                "id": info.name,
                "kind": "pipeline",
                "version": info.version,
                "state": pipeline_state(info, status),
                "lag": (status or {}).get("lag"),
                "running": (status or {}).get("running"),
                "desired": (status or {}).get("desired"),
                "parallelism": info.spec.parallelism_spec.constant
                or info.spec.parallelism_spec.coefficient
                or 1,
                "autoscaling": info.spec.autoscaled,
                "last_job": last.id if last else "",
                "last_job_state": last.state if last else "",
                "description": info.spec.description,
            }
        )
        for leaf in input_leaves(info.spec.input):
            edge = {"from": leaf.repo, "to": info.name, "glob": leaf.glob}
            if edge not in edges:
                edges.append(edge)
    known = {n["id"] for n in nodes}
    for edge in edges:  # an input repo deleted under its pipeline still shows, marked missing
        if edge["from"] not in known:
            nodes.append({"id": edge["from"], "kind": "repo", "missing": True})
            known.add(edge["from"])
    return {"nodes": nodes, "edges": edges}


def job_view(job: JobInfo, *, now: float) -> dict[str, Any]:
    """A job's figures: the counts, what is still queued, progress and duration."""
    done = job.data_processed + job.data_skipped + job.data_failed + job.data_recovered
    start = job.started or job.created
    return {
        "pipeline": job.pipeline,
        "id": job.id,
        "version": job.version,
        "state": job.state,
        "reason": job.reason,
        "total": job.data_total,
        "processed": job.data_processed,
        "skipped": job.data_skipped,
        "failed": job.data_failed,
        "recovered": job.data_recovered,
        "queued": max(job.data_total - done, 0),
        "progress": round(done / job.data_total, 4) if job.data_total else (1.0 if job.done else 0),
        "duration": round(((job.finished or now) if job.done else now) - start, 3),
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "input_commits": [msgspec.to_builtins(c) for c in job.input_commits],
        "output_commit": job.output_commit,
        "stats": msgspec.to_builtins(job.stats),
    }


def datum_row(did: str, state: str, result: DatumResult | None) -> dict[str, Any]:
    stats = result.stats if result is not None else None
    return {
        "id": did,
        "state": state,
        "attempts": result.attempts if result is not None else 0,
        "download_time": stats.download_time if stats else 0.0,
        "process_time": stats.process_time if stats else 0.0,
        "upload_time": stats.upload_time if stats else 0.0,
        "time": round(stats.download_time + stats.process_time + stats.upload_time, 3)
        if stats
        else 0.0,
        "download_bytes": stats.download_bytes if stats else 0,
        "upload_bytes": stats.upload_bytes if stats else 0,
        "files": [f.path for f in result.files] if result is not None else [],
        "error": result.error if result is not None else "",
        "has_log": bool(result is not None and result.logs),
    }


def datum_rows(
    job: JobInfo, first: dict[str, DatumResult], index: dict[str, DatumIndexEntry]
) -> list[dict[str, Any]]:
    """Every datum with a result, failed first, then slowest: what to look at first. A finished
    job's index says which result counted (one that came after its job was killed did not)."""
    rows = []
    for did in sorted(set(first) | set(index)):
        result = first.get(did)
        if job.done and job.datums and did not in index:
            result = None
        state = index[did].state if did in index else (result.state if result else "unknown")
        rows.append(datum_row(did, state, result))
    rows.sort(key=lambda r: (r["state"] not in FAILED_STATES, -r["time"], r["id"]))
    return rows


def commit_view(info: CommitInfo) -> dict[str, Any]:
    return {
        "repo": info.repo,
        "id": info.id,
        "branch": info.branch,
        "parent": info.parent,
        "origin": info.origin,
        "files": info.files,
        "size_bytes": info.size_bytes,
        "started": info.started,
        "finished": info.finished,
        "job": info.job,
        "provenance": [msgspec.to_builtins(c) for c in info.provenance],
    }


class FinishedJobs:
    """The datums of finished jobs, least recently shown dropped first, within KEPT_JOBS jobs and
    KEPT_RESULTS results."""

    def __init__(self, *, jobs: int = KEPT_JOBS, results: int = KEPT_RESULTS) -> None:
        self.max_jobs = jobs
        self.max_results = results
        self.results = 0
        self._kept: OrderedDict[
            tuple[str, str], tuple[dict[str, DatumResult], dict[str, DatumIndexEntry]]
        ] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def get(
        self, key: tuple[str, str]
    ) -> tuple[dict[str, DatumResult], dict[str, DatumIndexEntry]] | None:
        found = self._kept.get(key)
        if found is not None:
            self._kept.move_to_end(key)
        return found

    def put(
        self,
        key: tuple[str, str],
        first: dict[str, DatumResult],
        index: dict[str, DatumIndexEntry],
    ) -> None:
        size = max(len(first), len(index))
        if size > self.max_results or key in self._kept:
            return
        self._kept[key] = (first, index)
        self.results += size
        while len(self._kept) > self.max_jobs or self.results > self.max_results:
            _, (old_first, old_index) = self._kept.popitem(last=False)
            self.results -= max(len(old_first), len(old_index))


class Views:
    """Reads what the pages show. Broker and store failures come out as datumflow's errors."""

    def __init__(self, *, broker: Broker, store: ObjectStore) -> None:
        self.broker = broker
        self.store = store
        self.repos = Repos(broker=broker, store=store)
        self.pipelines = Pipelines(broker=broker, repos=self.repos)
        self._finished = FinishedJobs()
        self._live: dict[tuple[str, str], tuple[float, dict[str, DatumResult]]] = {}
        self._jobs = JobsCache(broker=broker, records=self.pipelines.jobs)

    async def close(self) -> None:
        await self._jobs.close()

    async def dag(self, latest: dict[str, dict[str, Any]]) -> dict[str, Any]:
        repos = await self.repos.list_repos()
        pipelines = await self.pipelines.list()
        last_jobs: dict[str, JobInfo] = {}
        for head in await self.pipelines.heads.all():  # one record per pipeline, not every job
            if head.last_job:
                job = await self.pipelines.jobs.find(job_key(head.pipeline, head.last_job))
                if job is not None:
                    last_jobs[head.pipeline] = job
        return dag_view(repos, pipelines, latest, last_jobs)

    async def jobs(self, pipeline: str = "") -> list[dict[str, Any]]:
        if pipeline:
            await self.pipelines.get(pipeline)
        jobs = newest_first(
            j for j in await self._jobs.all() if not pipeline or j.pipeline == pipeline
        )
        now = time.time()
        return [job_view(j, now=now) for j in jobs[:JOBS_LISTED]]

    async def _results(self, job: JobInfo) -> tuple[dict[str, DatumResult], dict[str, Any]]:
        key = (job.pipeline, job.id)
        kept = self._finished.get(key)
        if kept is not None:
            return kept
        now = time.monotonic()
        live = self._live.get(key)
        if live is not None and not job.done and now < live[0]:
            return live[1], {}
        first = results.first_results(await results.replay(self.broker, job.pipeline, job.id))
        if not job.done:
            # A running job's results are read again at most every LIVE_REREAD_PER_RESULT second
            # per result: a page left open on a huge job must not replay it all every poll.
            self._live = {key: (now + len(first) * LIVE_REREAD_PER_RESULT, first)}
        index: dict[str, DatumIndexEntry] = {}
        if job.datums:
            data = await self.store.get_bytes(job.datums)
            index = {e.datum: e for e in msgspec.json.decode(data, type=list[DatumIndexEntry])}
        if job.done:
            self._finished.put(key, first, index)
        return first, index

    async def job(self, pipeline: str, job_id: str) -> dict[str, Any]:
        job = await self.pipelines.get_job(pipeline, job_id)
        first, index = await self._results(job)
        rows = datum_rows(job, first, index)
        view = job_view(job, now=time.time())
        view["datums"] = rows[:DATUM_ROWS]
        view["datums_listed"] = min(len(rows), DATUM_ROWS)
        view["datums_with_result"] = len(rows)
        return view

    async def datum_log(self, pipeline: str, job_id: str, datum: str) -> str:
        """The end of the datum's kept log (stdout and stderr of its user code)."""
        job = await self.pipelines.get_job(pipeline, job_id)
        first, _ = await self._results(job)
        result = first.get(datum)
        if result is None:
            raise NotFound(f"datum {datum} of job {pipeline}@{job_id} has no result yet")
        if not result.logs:
            return ""
        data = await self.store.get_bytes(result.logs)
        return data[-LOG_TAIL:].decode(errors="replace")

    async def rerun(self, pipeline: str, job: str) -> dict[str, Any]:
        """Rerun the job's failed datums (datumflow.pfs.reruns, as `datumflow rerun job
        --failed`): the new job and its figures, or `nothing` with why for a job with none."""
        try:
            done = await rerun_failed(
                broker=self.broker, store=self.store, pipeline=pipeline, job=job
            )
        except NothingToRerun as exc:
            return {"pipeline": pipeline, "job": job, "nothing": True, "message": str(exc)}
        return {**msgspec.to_builtins(done), "nothing": False, "message": ""}

    async def commits(self, repo: str, branch: str = "master") -> dict[str, Any]:
        info = await self.repos.get_repo(repo)
        commits = await self.repos.list_commits(repo, branch, limit=COMMITS_LISTED)
        return {
            "repo": info.name,
            "pipeline": info.pipeline,
            "branch": branch,
            "commits": [commit_view(c) for c in commits],
        }

    async def files(self, repo: str, commit: str) -> dict[str, Any]:
        info = await self.repos.inspect_commit(repo, commit)
        files = await self.repos.files(info)
        return {
            "commit": commit_view(info),
            "files": [{"path": f.path, "size": f.size} for f in files[:FILES_LISTED]],
            "files_total": len(files),
        }
