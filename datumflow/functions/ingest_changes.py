"""The pure part of ingest: one batch's bookkeeping, ordering by sequencer, clashes between files
and directories, and commit ids. No I/O."""

from __future__ import annotations

import bisect
import hashlib
from collections import defaultdict
from typing import Any

import msgspec

from datumflow.broker.messages import FileRef
from datumflow.broker.settle import Msg
from datumflow.pfs.notifications import ObjectChange


class Batch:
    """One batch on its way to commits: its usable messages, their changes, and what was bad."""

    def __init__(self) -> None:
        self.msgs: list[Msg] = []
        self.changes: list[tuple[Msg, ObjectChange]] = []
        self._bad: dict[int, list[str]] = defaultdict(list)

    def blame(self, msg: Msg, reason: str) -> None:
        self._bad[id(msg)].append(reason)

    def reasons(self, msg: Msg) -> list[str]:
        return self._bad.get(id(msg), [])


def sequencer_key(sequencer: str) -> str:
    """Sequencers compare as hex numbers: pad to one length before comparing as strings."""
    return sequencer.upper().rjust(32, "0")


def object_url(change: ObjectChange) -> str:
    return f"s3://{change.bucket}/{change.key}"


def newer(change: ObjectChange, than: ObjectChange) -> bool:
    if change.sequencer and than.sequencer:
        return sequencer_key(change.sequencer) > sequencer_key(than.sequencer)
    return True  # arrival order


def ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(2, len(parts))]


def drop_conflicts(
    puts: list[tuple[FileRef, ObjectChange, Msg]],
    files: dict[str, FileRef],
    deletes: set[str],
    batch: Batch,
) -> list[tuple[FileRef, ObjectChange, Msg]]:
    """S3 may hold both `a` and `a/b`; a repo cannot. What the repo has wins, then the shallower
    path; a put that would clash is refused with a reason."""
    kept_paths = sorted(set(files) - deletes)  # consistent: a commit's files never clash
    new_files: set[str] = set()
    new_dirs: set[str] = set()
    kept = []
    for ref, change, msg in puts:  # in path order: a parent comes before its children
        path = ref.path
        if path in files and path not in deletes:
            kept.append((ref, change, msg))  # a new version of a file the repo has
            continue
        clash = ""
        for parent in ancestors(path):
            if parent in new_files or (parent in files and parent not in deletes):
                clash = f"{parent} is a file"
                break
        if not clash:
            below = bisect.bisect_left(kept_paths, path + "/")
            if below < len(kept_paths) and kept_paths[below].startswith(path + "/"):
                clash = f"{path} is a directory (it holds {kept_paths[below]})"
            elif path in new_dirs:
                clash = f"{path} is a directory"
        if clash:
            batch.blame(
                msg,
                f"{object_url(change)} cannot be the file {path}: {clash} in the repo;"
                " rename the object",
            )
            continue
        new_files.add(path)
        new_dirs.update(ancestors(path))
        kept.append((ref, change, msg))
    return kept


def commit_id(repo: str, branch: str, parent: str, puts: list[FileRef], deletes: list[str]) -> str:
    doc: list[Any] = [repo, branch, parent, puts, deletes]
    return hashlib.sha256(msgspec.json.encode(doc)).hexdigest()[:32]
