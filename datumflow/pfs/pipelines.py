"""Pipelines and jobs: their records, and the steps of creating, updating and deleting a pipeline."""

from __future__ import annotations

import builtins
import secrets
import time
from collections.abc import Iterable

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.kv import Records
from datumflow.broker.records import JobHead, JobInfo, PipelineInfo
from datumflow.broker.topology import (
    delete_pipeline_consumers,
    ensure_pipeline_consumers,
    ensure_worker_consumer,
    replan,
)
from datumflow.errors import Conflict, NotFound, SpecError
from datumflow.pfs.repos import Repos
from datumflow.scaling import ScalingError, params_for
from datumflow.spec import PipelineSpec, input_leaves


def job_key(pipeline: str, job: str) -> str:
    return f"{pipeline}.{job}"


def newest_first(jobs: Iterable[JobInfo]) -> list[JobInfo]:
    """Jobs in the order they are listed: the newest first."""
    return sorted(jobs, key=lambda j: (j.created, j.seq), reverse=True)


class Pipelines:
    def __init__(self, *, broker: Broker, repos: Repos) -> None:
        self.broker = broker
        self.repos = repos
        self.records = Records(broker, bucket=subjects.PIPELINES_BUCKET, type=PipelineInfo)
        self.jobs = Records(broker, bucket=subjects.JOBS_BUCKET, type=JobInfo)
        self.heads = Records(broker, bucket=subjects.JOB_HEADS_BUCKET, type=JobHead)

    async def get(self, name: str) -> PipelineInfo:
        info = await self.records.find(name)
        if info is None:
            raise NotFound(f"pipeline {name} does not exist")
        return info

    async def list(self) -> list[PipelineInfo]:
        return await self.records.all()

    async def _check_inputs(self, spec: PipelineSpec) -> None:
        """What a spec alone cannot say: its repos exist, its scaling overrides are in range."""
        for place in ("local", "kubernetes"):
            try:
                params_for(spec, nodes=1, place=place)
            except ScalingError as exc:
                # Refused here, not found later by a scaler that cannot size the workers.
                raise SpecError(str(exc)) from None
        for leaf in input_leaves(spec.input):
            if leaf.repo == spec.name:
                raise SpecError(f"input: pipeline {spec.name} cannot read its own output repo")
            try:
                await self.repos.get_repo(leaf.repo)
            except NotFound:
                raise SpecError(
                    f"input: repo {leaf.repo} does not exist; create it first"
                    f" (`datumflow create repo {leaf.repo}`) or create its pipeline"
                ) from None

    async def create(self, spec: PipelineSpec, *, ack_wait: float) -> PipelineInfo:
        """Create the output repo, the consumers, then the record that starts the planner."""
        if await self.records.find(spec.name) is not None:
            raise Conflict(
                f"pipeline {spec.name} already exists; use `update pipeline` to change it"
            )
        await self._check_inputs(spec)
        try:
            await self.repos.create_repo(spec.name, pipeline=spec.name)
        except Conflict:
            raise Conflict(
                f"repo {spec.name} already exists and is not this pipeline's output; choose"
                " another pipeline name or delete the repo"
            ) from None
        await ensure_pipeline_consumers(self.broker, spec, ack_wait=ack_wait)
        now = time.time()
        info = PipelineInfo(
            name=spec.name,
            version=1,
            spec=spec,
            salt=spec.salt or secrets.token_hex(16),
            created=now,
            updated=now,
        )
        if not await self.records.create(spec.name, info):
            raise Conflict(f"pipeline {spec.name} already exists")
        await self.heads.create(spec.name, JobHead(pipeline=spec.name))
        return info

    async def update(self, spec: PipelineSpec, *, ack_wait: float, reprocess: bool) -> PipelineInfo:
        """A new version; the salt is kept (so unchanged datums are skipped) unless `reprocess`."""
        await self.get(spec.name)
        await self._check_inputs(spec)
        await ensure_worker_consumer(self.broker, spec, ack_wait=ack_wait)

        def bump(info: PipelineInfo) -> PipelineInfo:
            return PipelineInfo(
                name=info.name,
                version=info.version + 1,
                spec=spec,
                salt=secrets.token_hex(16) if reprocess else info.salt,
                created=info.created,
                updated=time.time(),
            )

        info = await self.records.update(spec.name, bump)
        await replan(self.broker, spec)
        return info

    async def delete(self, name: str) -> None:
        """Stop the pipeline, forget its jobs and remove its output repo, as Pachyderm does."""
        await self.get(name)
        await self.records.delete(name)
        await delete_pipeline_consumers(self.broker, name)
        for key in await self.jobs.keys(f"{name}."):
            await self.jobs.delete(key)
        await self.heads.delete(name)
        repo = await self.repos.repos.find(name)
        if repo is not None and repo.pipeline == name:
            await self.repos.delete_repo(name)

    # -- jobs --------------------------------------------------------------------------------

    async def get_job(self, pipeline: str, job: str) -> JobInfo:
        info = await self.jobs.find(job_key(pipeline, job))
        if info is None:
            raise NotFound(f"job {pipeline}@{job} does not exist")
        return info

    # `builtins.list`: in this class `list` names the method above.
    async def list_jobs(self, pipeline: str = "") -> builtins.list[JobInfo]:
        return newest_first(await self.jobs.all(f"{pipeline}." if pipeline else ""))
