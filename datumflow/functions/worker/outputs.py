"""Collecting a datum's output: every file under /pfs/out, stored and listed in path order."""

from __future__ import annotations

import os
from pathlib import Path

from datumflow.broker.messages import FileRef
from datumflow.errors import PermanentError
from datumflow.pfs.paths import BadPath, clean_path
from datumflow.storage.base import ObjectStore


def _walk(out: Path) -> list[tuple[str, Path]]:
    """(repo path, file to read) for every file under `out`, refusing anything that leads out."""
    root = out.resolve()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(out, followlinks=False):
        here = Path(dirpath)
        for name in [*filenames, *[d for d in dirnames if (here / d).is_symlink()]]:
            entry = here / name
            relative = entry.relative_to(out).as_posix()
            target = entry.resolve() if entry.is_symlink() else entry
            if entry.is_symlink() and not target.is_relative_to(root):
                raise PermanentError(
                    f"/pfs/out/{relative} is a symlink to {target}, outside /pfs/out; write the"
                    " file itself into /pfs/out"
                )
            if target.is_dir():
                raise PermanentError(
                    f"/pfs/out/{relative} links to a directory; copy the files instead"
                )
            if not target.is_file():
                continue  # sockets, fifos: not data
            try:
                found.append((clean_path(relative), target))
            except BadPath as exc:
                raise PermanentError(f"output file {relative!r}: {exc}") from None
    return sorted(found)


async def collect_outputs(store: ObjectStore, out: Path) -> list[FileRef]:
    if not out.exists():
        return []
    refs = []
    for path, target in _walk(out):
        key, size = await store.put_file(target)
        refs.append(FileRef(path=path, size=size, hash=key))
    return refs
