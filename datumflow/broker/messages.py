"""Wire messages: the documented, versioned JSON schema of every event datumflow publishes.

This module depends on msgspec and the standard library only, so that any producer can copy it, and
`datumflow schema commit-event` prints its JSON Schema. Every message carries `v`; a consumer refuses
a version it does not know with an error that says so.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

VERSION = 1
MAX_MESSAGE = 1 << 20
"""Messages larger than this are refused before decoding (the streams allow up to 8 MiB)."""


class _Wire(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    pass


class ObjectSource(_Wire, kw_only=True):
    """A file referenced in place in a bucket instead of copied into the store."""

    url: str
    """s3://bucket/key (the key not URL-encoded)."""
    etag: str = ""
    version_id: str = ""


class FileRef(_Wire, kw_only=True):
    """One file of a commit: its path in the repo and where its bytes are."""

    path: str
    """Absolute path in the repo, e.g. /images/cat.png."""
    size: int = 0
    hash: str = ""
    """sha256 hex of the content; the object's key in the content-addressed store."""
    source: ObjectSource | None = None
    """Set when the bytes stay where a producer put them (bucket notifications)."""


class CommitRef(_Wire, kw_only=True):
    repo: str
    commit: str
    branch: str = ""


Origin = Literal["user", "pipeline", "ingest", "external"]


class CommitEvent(_Wire, kw_only=True):
    """Published on `df.commit.<repo>` when a commit is finished, with Nats-Msg-Id = commit.

    Datumflow's own commits carry `manifest`, the object key of the commit's full file list. An
    external producer may instead list `files` (every file of the new head, or with `parent` set,
    only what changed: see `deleted`) whose objects are already in the store or referenced in place.
    """

    v: int = VERSION
    repo: str
    branch: str = "master"
    commit: str
    parent: str = ""
    manifest: str = ""
    files: list[FileRef] | None = None
    deleted: list[str] = []
    """Paths removed relative to the parent (external producers with `parent` set)."""
    origin: Origin = "external"
    provenance: list[CommitRef] = []


class DatumInput(_Wire, kw_only=True):
    """One input's part of a datum: the files it matched."""

    name: str
    repo: str
    branch: str
    commit: str
    files: list[FileRef]
    root: str = "/"
    """The matched path (a file, or a directory whose subtree is `files`)."""


class DatumTask(_Wire, kw_only=True):
    """Published on `df.datum.<pipeline>`, Nats-Msg-Id = job:datum. One unit of work, or with
    `more` several (Nats-Msg-Id = job:set:<first datum>:<count>)."""

    v: int = VERSION
    pipeline: str
    version: int
    job: str
    datum: str
    hash: str
    inputs: list[DatumInput]
    tries: int = 0
    """Attempts of the user code made before this message: a datum a worker gave back without
    running it to an end is published again as a new message carrying them
    (functions.worker.handback), so that only attempts count against datum_tries."""
    more: list[DatumTask] = []
    """Further datums of the same job carried by this message: a datum set planned together
    (functions.datum_sets), so that tiny datums do not cost a message each. Each datum is run,
    reported and retried on its own (broker.set_parts); the message is acked once all are."""


DatumState = Literal["success", "failed", "recovered", "skipped"]


class DatumStats(_Wire, kw_only=True):
    download_time: float = 0.0
    process_time: float = 0.0
    upload_time: float = 0.0
    download_bytes: int = 0
    upload_bytes: int = 0


class DatumResult(_Wire, kw_only=True):
    """Published on `df.result.<pipeline>.<job>`, Nats-Msg-Id = job:datum:state."""

    v: int = VERSION
    pipeline: str
    job: str
    datum: str
    hash: str = ""
    state: DatumState
    output: str = ""
    """Object key of the datum's output manifest (files under /pfs/out); "" for none."""
    files: list[FileRef] = []
    """The datum's input files, for `list datum`."""
    stats: DatumStats = msgspec.field(default_factory=DatumStats)
    error: str = ""
    logs: str = ""
    """Object key of the captured stdout/stderr of the user code."""
    attempts: int = 1


LISTED_FILES = 1000
"""Input files a result lists (`DatumResult.files`); past that none (`list datum` enumerates them
anyway), so that a result always fits in a message."""


def listed(files: list[FileRef]) -> list[FileRef]:
    return files if len(files) <= LISTED_FILES else []


class DatumResults(_Wire, kw_only=True):
    """Several results of one job in one message, published on `df.result.<pipeline>.<job>.set`
    with Nats-Msg-Id = job:set:<digest of its datums and states>.

    A worker reports the datums it finished since its last report together: for tiny datums one
    message per datum would cost the broker and the committer more than the datums themselves."""

    v: int = VERSION
    pipeline: str
    job: str
    results: list[DatumResult]


class JobPlanned(_Wire, kw_only=True):
    """Published on `df.job.<pipeline>.<job>` once every datum of the job is queued."""

    v: int = VERSION
    pipeline: str
    job: str
    data_total: int


class RerunRequest(_Wire, kw_only=True):
    """Published on `df.rerun.<pipeline>`, Nats-Msg-Id = rerun:<pipeline>:<job>:<created>: run the failed
    datums of a finished job again, in a new job on the same input commits (`pfs/reruns.py`).

    It travels in the commit stream, through the pipeline's planner consumer, so that it is
    planned in turn with the pipeline's commit events: one job at a time."""

    v: int = VERSION
    pipeline: str
    job: str
    """The job whose failed datums run again: the pipeline's newest when it was asked."""
    created: float
    """That job's `created`, as the asker read it: a request read again once the pipeline has
    been deleted and made anew names a job of the same id that it was not about."""


class DeadLetter(_Wire, kw_only=True):
    """Published on `df.dead.<function>`: a message we could not use, and why."""

    v: int = VERSION
    function: str
    subject: str
    reason: str
    data: str
    """The original payload, as text (undecodable bytes replaced)."""
    headers: dict[str, str] = {}


def commit_event_schema() -> dict[str, Any]:
    """JSON Schema of the commit event, for producers outside datumflow."""
    return msgspec.json.schema(CommitEvent)
