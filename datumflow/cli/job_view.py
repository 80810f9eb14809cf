"""What the CLI knows of a job's datums, and of the datums a spec would run: the query model
behind `list datum` and `inspect datum`.

A job's datums come from three places: its input commits enumerated again (every datum, with its
files, also the ones not yet done), its results in the results stream (state, time, error, logs),
and, once it has finished, its datum index (the state that counted). A dry run enumerates a spec's
input on the current branch heads with the planner's own enumeration (`job_datums`), so what it
shows is what a job would run.
"""

from __future__ import annotations

import msgspec

from datumflow.broker.messages import DatumInput, DatumResult
from datumflow.broker.records import CommitInfo, DatumIndexEntry, JobInfo
from datumflow.cli.context import Api
from datumflow.errors import DatumflowError, NotFound
from datumflow.pfs import results
from datumflow.pfs.datums import Leaf, job_datums
from datumflow.spec import PipelineSpec, input_leaves, input_name


class DatumFile(msgspec.Struct, kw_only=True):
    """One input's part of a datum: the path its glob matched (`/dir/` for a directory)."""

    input: str
    repo: str
    path: str


class PlannedDatum(msgspec.Struct, kw_only=True):
    id: str
    files: list[DatumFile]


class JobDatum(msgspec.Struct, kw_only=True):
    id: str
    files: list[DatumFile]
    state: str
    """success, failed, recovered, skipped; starting while the job runs and the datum has no
    result yet; killed for a datum its killed job never ran."""
    time: float
    """Seconds spent downloading, processing and uploading (0 for a skipped datum)."""


def files_of(inputs: list[DatumInput]) -> list[DatumFile]:
    return [DatumFile(input=i.name, repo=i.repo, path=i.root) for i in inputs]


def datum_seconds(result: DatumResult | None) -> float:
    if result is None:
        return 0.0
    s = result.stats
    return round(s.download_time + s.process_time + s.upload_time, 3)


async def planned_datums(api: Api, spec: PipelineSpec) -> list[PlannedDatum]:
    """The datums of `spec`'s input on the current heads of its branches; creates nothing."""
    leaves = []
    for leaf in input_leaves(spec.input):
        try:
            await api.repos.get_repo(leaf.repo)
        except NotFound:
            raise DatumflowError(
                f"input {input_name(leaf)}: repo {leaf.repo} does not exist; create it with"
                f" `datumflow create repo {leaf.repo}`"
            ) from None
        head = await api.repos.head(leaf.repo, leaf.branch)
        leaves.append(await _leaf(api, leaf.repo, leaf.branch, input_name(leaf), head))
    return [
        PlannedDatum(id=did, files=files_of(inputs))
        for did, inputs in job_datums(spec.input, leaves)
    ]


async def _leaf(api: Api, repo: str, branch: str, name: str, commit: CommitInfo | None) -> Leaf:
    return Leaf(
        name=name,
        repo=repo,
        branch=branch,
        commit=commit.id if commit else "",
        files=await api.repos.files(commit),
    )


class JobView:
    """Everything known of one job's datums, gathered once."""

    def __init__(
        self,
        *,
        job: JobInfo,
        planned: list[tuple[str, list[DatumInput]]] | None,
        first: dict[str, DatumResult],
        index: dict[str, DatumIndexEntry],
    ) -> None:
        self.job = job
        self.planned = planned
        self.first = first
        self.index = index
        self._inputs = dict(planned or [])

    @classmethod
    async def load(cls, api: Api, pipeline: str, job_id: str) -> JobView:
        job = await api.pipelines.get_job(pipeline, job_id)
        events = await results.replay(api.broker, pipeline, job_id)
        index: dict[str, DatumIndexEntry] = {}
        if job.datums:
            data = await api.store.get_bytes(job.datums)
            entries = msgspec.json.decode(data, type=list[DatumIndexEntry])
            index = {e.datum: e for e in entries}
        spec = await _spec_of(api, job)
        planned = None
        if spec is not None:
            leaves = []
            for leaf in input_leaves(spec.input):
                commit = await _input_commit(api, job, leaf.repo, leaf.branch)
                leaves.append(await _leaf(api, leaf.repo, leaf.branch, input_name(leaf), commit))
            planned = list(job_datums(spec.input, leaves))
        return cls(job=job, planned=planned, first=results.first_results(events), index=index)

    def ids(self) -> list[str]:
        """Every datum, in the order the planner queued them; any only the results know after."""
        ordered = [did for did, _ in self.planned or []]
        known = set(ordered)
        extra = sorted((set(self.first) | set(self.index)) - known)
        return ordered + extra

    def counted(self, did: str) -> DatumResult | None:
        """The datum's result that counted: for a finished job, only one in its index (a
        result that came after its job was killed was ignored)."""
        if self.job.done and self.job.datums and did not in self.index:
            return None
        return self.first.get(did)

    def state(self, did: str) -> str:
        if did in self.index:
            return self.index[did].state
        result = self.counted(did)
        if result is not None:
            return result.state
        if not self.job.done:
            return "starting"
        return "killed" if self.job.state == "killed" else "unprocessed"

    def inputs(self, did: str) -> list[DatumInput] | None:
        return self._inputs.get(did)

    def files(self, did: str) -> list[DatumFile]:
        inputs = self.inputs(did)
        if inputs is not None:
            return files_of(inputs)
        # The pipeline's spec of that version is gone: the result still lists the files.
        result = self.first.get(did)
        return [DatumFile(input="", repo="", path=f.path) for f in (result.files if result else [])]

    def datums(self) -> list[JobDatum]:
        return [
            JobDatum(
                id=did,
                files=self.files(did),
                state=self.state(did),
                time=datum_seconds(self.counted(did)),
            )
            for did in self.ids()
        ]

    def find(self, prefix: str) -> str:
        """The datum id that starts with `prefix` (ids are long; reasons show 12 characters)."""
        matches = [did for did in self.ids() if did.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        where = f"{self.job.pipeline}@{self.job.id}"
        if not matches:
            raise NotFound(f"no datum {prefix} in job {where}; `datumflow list datum {where}`")
        raise DatumflowError(
            f"{prefix} is the start of {len(matches)} datums of {where}; give more"
        )


async def _spec_of(api: Api, job: JobInfo) -> PipelineSpec | None:
    """The spec of the pipeline version that ran `job`, if the pipeline record still has it."""
    info = await api.pipelines.records.find(job.pipeline)
    if info is not None and info.version == job.version:
        return info.spec
    try:
        history = await api.pipelines.records.history(job.pipeline)
    except DatumflowError:
        return None  # the files come from the results
    for old in history:
        if old.version == job.version:
            return old.spec
    return None  # older than the bucket's history


async def _input_commit(api: Api, job: JobInfo, repo: str, branch: str) -> CommitInfo | None:
    for ref in job.input_commits:
        if ref.repo == repo and ref.branch in ("", branch):
            return await api.repos.commits.find(f"{ref.repo}.{ref.commit}")
    return None  # the branch had no commit when the job was planned
