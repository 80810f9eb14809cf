"""Merging a finished job's datum outputs into the tree of its output commit: the union of every
successful (or skipped) datum's files, path by path, refusing what cannot be one tree (two datums
writing one path, or one path both a file and a directory), which fails the job saying which
datums did it.
"""

from __future__ import annotations

from datumflow.broker.messages import FileRef
from datumflow.errors import PermanentError
from datumflow.functions.tally import Tally
from datumflow.pfs import manifest
from datumflow.storage.base import ObjectStore


async def merge_outputs(*, store: ObjectStore, tally: Tally) -> list[FileRef]:
    """The union of the datums' outputs; two datums writing one path fail the job."""
    owner: dict[str, str] = {}
    merged: dict[str, FileRef] = {}
    for result in sorted(tally.results.values(), key=lambda r: r.datum):
        if result.state not in ("success", "skipped") or not result.output:
            continue
        for ref in await manifest.read(store, result.output):
            if ref.path in merged:
                raise PermanentError(
                    f"duplicate path output by different datums: {ref.path} (datums"
                    f" {owner[ref.path][:12]} and {result.datum[:12]}); make each datum write"
                    " its own paths, e.g. named after its input file"
                )
            owner[ref.path] = result.datum
            merged[ref.path] = ref
    ordered = [merged[p] for p in sorted(merged)]
    for ref in ordered:
        parent = ref.path.rsplit("/", 1)[0]
        while parent:
            if parent in merged:
                raise PermanentError(
                    f"{parent} is output both as a file (datum {owner[parent][:12]}) and as a"
                    f" directory (datum {owner[ref.path][:12]})"
                )
            parent = parent.rsplit("/", 1)[0]
    return ordered
