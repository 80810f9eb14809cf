"""Names and paths: `REPO@BRANCH:/PATH`, `REPO@COMMIT`, `PIPELINE@JOB`, and clean repo paths."""

from __future__ import annotations

import posixpath
import re

import msgspec

from datumflow.errors import PermanentError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
MAX_PATH = 4096
MAX_SEGMENT = 255


class BadPath(PermanentError):
    """A repo name, branch or path that datumflow refuses."""


class FileAddress(msgspec.Struct, frozen=True):
    repo: str
    ref: str
    """A branch name or a commit id."""
    path: str


def check_name(name: str, *, what: str = "repo") -> str:
    if not NAME_RE.match(name):
        raise BadPath(
            f"{what} name {name!r} is invalid: use 1-63 letters, digits, '_' or '-',"
            " starting with a letter or digit"
        )
    return name


def clean_path(path: str) -> str:
    """An absolute, normalised repo path. Refuses `..`, NUL and overlong names: a repo path never
    escapes its repo, whatever the producer sent."""
    if "\x00" in path:
        raise BadPath(f"path {path!r} contains a NUL byte")
    if len(path) > MAX_PATH:
        raise BadPath(f"path is {len(path)} characters long; the limit is {MAX_PATH}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadPath(f"path {path!r} contains a '..' segment; give a path inside the repo")
    for part in parts:
        if len(part.encode()) > MAX_SEGMENT:
            raise BadPath(f"path segment {part[:40]!r}... is longer than {MAX_SEGMENT} bytes")
    return "/" + "/".join(parts)


def join(*parts: str) -> str:
    return clean_path(posixpath.join("/", *[p.lstrip("/") for p in parts]))


def parse_address(
    text: str, *, default_branch: str = "master", need_path: bool = False
) -> FileAddress:
    """`repo`, `repo@branch`, `repo@branch:/path` or `repo@commit:/path`."""
    head, sep, path = text.partition(":")
    if need_path and not sep:
        raise BadPath(f"{text!r}: expected REPO@BRANCH:/PATH")
    repo, at, ref = head.partition("@")
    if at and not ref:
        raise BadPath(f"{text!r}: nothing after '@'; expected REPO@BRANCH")
    check_name(repo)
    ref = ref or default_branch
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", ref):
        raise BadPath(f"{text!r}: {ref!r} is not a valid branch or commit id")
    return FileAddress(repo=repo, ref=ref, path=clean_path(path) if sep else "/")


def parse_job(text: str) -> tuple[str, str]:
    """`PIPELINE@JOB`."""
    pipeline, at, job = text.partition("@")
    if not at or not job:
        raise BadPath(f"{text!r}: expected PIPELINE@JOB")
    check_name(pipeline, what="pipeline")
    return pipeline, job
