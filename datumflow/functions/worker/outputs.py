"""Collecting a datum's output: every file under /pfs/out, stored and listed in path order."""

from __future__ import annotations

import os
from pathlib import Path

from datumflow.broker.messages import FileRef
from datumflow.errors import PermanentError
from datumflow.pfs.paths import BadPath, clean_path
from datumflow.storage.base import ObjectStore


def _walk(out: Path) -> list[tuple[str, Path]]:
    """(repo path, file to read) for every file under `out`, refusing anything that leads out.
    Plain strings and the directory entries' own types: this runs for every datum, and most
    leave a file or two and no symlink."""
    root = ""  # `out` resolved, once a symlink needs it
    found: list[tuple[str, Path]] = []
    todo = [("", str(out))]
    while todo:
        prefix, directory = todo.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue  # gone, or not a directory: as os.walk skips it
        for entry in entries:
            relative = prefix + entry.name
            if entry.is_symlink():
                root = root or os.path.realpath(out)
                target = os.path.realpath(entry.path)
                if target != root and not target.startswith(root + "/"):
                    raise PermanentError(
                        f"/pfs/out/{relative} is a symlink to {target}, outside /pfs/out; write"
                        " the file itself into /pfs/out"
                    )
                if os.path.isdir(target):
                    raise PermanentError(
                        f"/pfs/out/{relative} links to a directory; copy the files instead"
                    )
                if not os.path.isfile(target):
                    continue  # sockets, fifos: not data
                file = target
            elif entry.is_dir(follow_symlinks=False):
                todo.append((relative + "/", entry.path))
                continue
            elif entry.is_file(follow_symlinks=False):
                file = entry.path
            else:
                continue  # sockets, fifos: not data
            try:
                found.append((clean_path(relative), Path(file)))
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
