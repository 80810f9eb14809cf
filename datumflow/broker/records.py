"""Records kept in the JetStream KV buckets: repos, branches, commits, pipelines, jobs.

Field names follow Pachyderm's (`data_total`, `data_processed`, ...), so `--json` output reads the way
a Pachyderm user expects. Every state change is a compare-and-set on the record's KV revision.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from datumflow.broker.messages import CommitRef, DatumStats, Origin
from datumflow.spec import PipelineSpec


class _Record(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    pass


class RepoInfo(_Record, kw_only=True):
    name: str
    created: float
    description: str = ""
    pipeline: str = ""
    """Set for a pipeline's output repo."""


class CommitInfo(_Record, kw_only=True):
    repo: str
    id: str
    branch: str
    parent: str = ""
    manifest: str
    """Object key of the commit's full file list (JSON lines of FileRef, sorted by path)."""
    size_bytes: int = 0
    files: int = 0
    origin: Origin = "user"
    provenance: list[CommitRef] = []
    started: float
    finished: float
    job: str = ""
    """For an output commit: the job that made it."""


PipelineState = Literal["starting", "running", "standby", "paused", "failure"]


class PipelineInfo(_Record, kw_only=True):
    name: str
    version: int
    spec: PipelineSpec
    salt: str
    created: float
    updated: float


JobState = Literal["created", "starting", "running", "finishing", "success", "failure", "killed"]
TERMINAL_JOB_STATES = ("success", "failure", "killed")


class JobInfo(_Record, kw_only=True):
    pipeline: str
    id: str
    version: int
    state: JobState = "created"
    seq: int
    """Order of the job among its pipeline's jobs (the commit event's stream sequence)."""
    input_commits: list[CommitRef] = []
    output_commit: str = ""
    data_total: int = 0
    data_processed: int = 0
    data_skipped: int = 0
    data_failed: int = 0
    data_recovered: int = 0
    stats: DatumStats = msgspec.field(default_factory=DatumStats)
    reason: str = ""
    created: float
    started: float = 0.0
    finished: float = 0.0
    datums: str = ""
    """Object key of the job's datum index (id, hash, state, output) once it has finished."""
    rerun_of: str = ""
    """For a rerun of a job's failed datums (`datumflow rerun job`): the job rerun."""
    fence: int = 0
    """The committer lease's fence of the last committer that wrote the record
    (datumflow.broker.lease): one that lost its lease finds a higher one here and stops."""

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_JOB_STATES


class BranchInfo(_Record, kw_only=True):
    repo: str
    name: str
    head: str


class JobHead(_Record, kw_only=True):
    """Per pipeline: its newest job, and the newest that succeeded (what skipping compares to)."""

    pipeline: str
    last_job: str = ""
    last_success: str = ""


class DatumIndexEntry(_Record, kw_only=True):
    """One line of a finished job's datum index: what the next job compares against to skip."""

    datum: str
    hash: str
    state: str
    output: str = ""


class LeaseInfo(_Record, kw_only=True):
    """Who holds one function's lease (the `df_leases` bucket; datumflow.broker.lease)."""

    holder: str
    """`host:pid/nonce`, new each time a replica takes the lease."""
    host: str
    pid: int
    since: float
    """When this holder took the lease (wall clock, for people)."""
