"""Datum enumeration: which files of which input commits each datum of a job gets.

Pure computation over file lists, no I/O. A glob is matched against every file and every directory
of an input commit; each match is one part of a datum. A matched directory brings its whole subtree
and is listed with a trailing slash (`/dir/`). The combinators (union, cross, join, group) then build
datums out of the parts, nesting freely.

A single pfs input streams: its file list may be a generator over a huge manifest, and datums come
out as the files go by. The combinators materialise their inputs (cross streams its first one).

Datums come out in a deterministic order: a pfs input's in order of their roots (the order a sorted
file list gives them), a join's and a group's in order of their keys.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import msgspec

from datumflow.broker.messages import DatumInput, FileRef
from datumflow.errors import PermanentError, SpecError
from datumflow.pfs.glob import Glob, check_template, compile_glob, expand_template
from datumflow.spec import Input, input_leaves, input_name


class Leaf(msgspec.Struct, kw_only=True):
    """One pfs input of a job: the commit it reads and that commit's files."""

    name: str
    repo: str
    branch: str
    commit: str
    files: Iterable[FileRef]
    """Sorted by path, each path once. May be a one-shot generator."""


class Match(msgspec.Struct, kw_only=True):
    """One path a glob matched: a file, or a directory with its subtree."""

    root: str
    """The file's path, `/dir/` for a directory, `/` for the root."""
    files: list[FileRef]
    captures: list[str]


# ------------------------------------------------------------------------------------ one input


class _Pending(msgspec.Struct):
    """A match waiting in line: a directory's is done once the files leave its subtree."""

    match: Match
    done: bool


def match_files(glob: Glob, files: Iterable[FileRef]) -> Iterator[Match]:
    """Every file and directory under `files` that `glob` matches, in order of root.

    Streams: holds only the ancestors of the current file and the subtrees of matched directories
    still open (a subtree is contiguous in sorted order). Raises PermanentError when the files are
    not sorted by path, since the streaming depends on it.
    """
    if glob.root_only:
        everything = list(_checked(files))
        # An empty commit gives no datum, even for "/": there is nothing to process.
        if everything:
            yield Match(root="/", files=everything, captures=["/"])
        return
    # Open directories are the ancestors of the last file, outermost first, each with its pending
    # match (None when the glob does not match that directory).
    open_dirs: list[tuple[str, _Pending | None]] = []
    queue: deque[_Pending] = deque()
    for ref in _checked(files):
        path = ref.path
        segments = path.split("/")
        ancestors = ["/".join(segments[:i]) for i in range(2, len(segments))]
        keep = 0
        while (
            keep < len(open_dirs)
            and keep < len(ancestors)
            and open_dirs[keep][0] == ancestors[keep]
        ):
            keep += 1
        for _, pending in open_dirs[keep:]:
            if pending is not None:
                pending.done = True
        del open_dirs[keep:]
        for directory in ancestors[keep:]:
            captures = glob.match(directory)
            pending = None
            if captures is not None:
                pending = _Pending(Match(root=directory + "/", files=[], captures=captures), False)
                queue.append(pending)
            open_dirs.append((directory, pending))
        captures = glob.match(path)
        if captures is not None:
            queue.append(_Pending(Match(root=path, files=[ref], captures=captures), True))
        for _, pending in open_dirs:
            if pending is not None:
                pending.match.files.append(ref)
        # A match may leave only when every match before it in root order has.
        while queue and queue[0].done:
            yield queue.popleft().match
    for pending in queue:
        yield pending.match


def _checked(files: Iterable[FileRef]) -> Iterator[FileRef]:
    previous = ""
    for ref in files:
        if not ref.path.startswith("/"):
            raise PermanentError(f"file path {ref.path!r} is not absolute")
        if ref.path <= previous:
            raise PermanentError(
                f"files are not sorted by path, or repeat one: {ref.path!r} after {previous!r}"
            )
        previous = ref.path
        yield ref


# ------------------------------------------------------------------------------------ combinators


class _Part(msgspec.Struct, frozen=True):
    """One input's part of a datum, with the keys its templates gave it (None: no template)."""

    input: DatumInput
    join_key: str | None
    group_key: str | None


_Datum = tuple[_Part, ...]
_Key = tuple[str, ...]


def _join_key(datum: _Datum) -> _Key:
    # A datum made of several parts (a cross under a join, say) is keyed by the distinct keys of
    # the parts that have a template; with no template anywhere every key is () and a join is a
    # cross, as Pachyderm's "" keys make it.
    return tuple(dict.fromkeys(p.join_key for p in datum if p.join_key is not None))


def _group_key(datum: _Datum) -> _Key:
    return tuple(dict.fromkeys(p.group_key for p in datum if p.group_key is not None))


def enumerate_datums(inp: Input, leaves: Sequence[Leaf]) -> Iterator[list[DatumInput]]:
    """The datums of one job: `leaves` are the pfs inputs in `input_leaves(inp)` order.

    Raises SpecError for a bad glob or template, ValueError when `leaves` do not fit the spec.
    """
    check_input(inp)
    specs = input_leaves(inp)
    if len(specs) != len(leaves):
        raise ValueError(f"the input has {len(specs)} pfs inputs, {len(leaves)} leaves given")
    for pfs, leaf in zip(specs, leaves, strict=True):
        if (input_name(pfs), pfs.repo) != (leaf.name, leaf.repo):
            raise ValueError(
                f"leaf {leaf.name!r} of repo {leaf.repo!r} given where the spec has input"
                f" {input_name(pfs)!r} of repo {pfs.repo!r}"
            )
    for datum in _datums(inp, list(leaves)):
        yield [part.input for part in datum]


def _datums(inp: Input, leaves: list[Leaf]) -> Iterator[_Datum]:
    if inp.pfs is not None:
        yield from _pfs_datums(inp, leaves[0])
        return
    children = inp.cross or inp.union or inp.join or inp.group or []
    # Hand each child its own slice of the leaves, which come depth first.
    slices: list[list[Leaf]] = []
    start = 0
    for child in children:
        count = len(input_leaves(child))
        slices.append(leaves[start : start + count])
        start += count
    streams = [_datums(child, part) for child, part in zip(children, slices, strict=True)]
    if inp.union is not None:
        yield from itertools.chain.from_iterable(streams)
    elif inp.cross is not None:
        yield from _cross(streams)
    elif inp.join is not None:
        outer = [any(p.outer_join for p in input_leaves(child)) for child in children]
        yield from _join(streams, outer)
    else:
        yield from _group(streams)


def _pfs_datums(inp: Input, leaf: Leaf) -> Iterator[_Datum]:
    pfs = inp.pfs
    assert pfs is not None
    glob = compile_glob(pfs.glob)
    for match in match_files(glob, leaf.files):
        part = _Part(
            DatumInput(
                name=leaf.name,
                repo=leaf.repo,
                branch=leaf.branch,
                commit=leaf.commit,
                files=match.files,
                root=match.root,
            ),
            expand_template(pfs.join_on, match.captures) if pfs.join_on else None,
            expand_template(pfs.group_by, match.captures) if pfs.group_by else None,
        )
        yield (part,)


def _cross(streams: list[Iterator[_Datum]]) -> Iterator[_Datum]:
    # Materialise all but the first, so that the first (often the big one) still streams, and an
    # empty input empties the product before anything is yielded.
    rest = [list(s) for s in streams[1:]]
    if any(not r for r in rest):
        return
    for head in streams[0]:
        for combo in itertools.product(*rest):
            yield head + tuple(itertools.chain.from_iterable(combo))


def _join(streams: list[Iterator[_Datum]], outer: list[bool]) -> Iterator[_Datum]:
    by_key: list[dict[_Key, list[_Datum]]] = []
    for stream in streams:
        keyed: dict[_Key, list[_Datum]] = {}
        for datum in stream:
            keyed.setdefault(_join_key(datum), []).append(datum)
        by_key.append(keyed)
    keys = sorted(set().union(*by_key))
    for key in keys:
        present = [i for i, keyed in enumerate(by_key) if key in keyed]
        if len(present) < len(by_key):
            # A key some inputs lack survives only through outer inputs, and only they are in it.
            present = [i for i in present if outer[i]]
            if not present:
                continue
        for combo in itertools.product(*(by_key[i][key] for i in present)):
            yield tuple(itertools.chain.from_iterable(combo))


def _group(streams: list[Iterator[_Datum]]) -> Iterator[_Datum]:
    groups: dict[_Key, list[_Part]] = {}
    for stream in streams:
        for datum in stream:
            groups.setdefault(_group_key(datum), []).extend(datum)
    for key in sorted(groups):
        yield tuple(groups[key])


# ------------------------------------------------------------------------------------ checks, ids


def check_input(inp: Input) -> None:
    """Compile every glob and check every template against its glob; SpecError names the field."""
    _check(inp, "input")


def _check(inp: Input, where: str) -> None:
    if inp.pfs is not None:
        pfs = inp.pfs
        try:
            glob = compile_glob(pfs.glob)
        except SpecError as exc:
            raise SpecError(f"{where}.pfs.glob: {exc}") from None
        for field in ("join_on", "group_by"):
            template = getattr(pfs, field)
            check_template(template, glob.groups, f"{where}.pfs.{field}", glob=pfs.glob)
        return
    for kind in ("cross", "union", "join", "group"):
        children = getattr(inp, kind)
        if children is not None:
            for i, child in enumerate(children):
                _check(child, f"{where}.{kind}[{i}]")


def _sha256(value: object) -> str:
    # JSON of nested lists is unambiguous: no two different values encode the same.
    return hashlib.sha256(msgspec.json.encode(value)).hexdigest()


def datum_id(inputs: Sequence[DatumInput]) -> str:
    """Stable across jobs: the same paths of the same inputs give the same id whatever the commit."""
    return _sha256([[i.name, i.repo, i.branch, i.root] for i in inputs])


def datum_hash(datum_id: str, inputs: Sequence[DatumInput], salt: str) -> str:
    """Changes when any input file's content changes, or the salt does (a forced reprocess)."""
    files = []
    for inp in inputs:
        for ref in sorted(inp.files, key=lambda r: r.path):
            # A file referenced in place may carry no content hash yet; its object's identity
            # stands in for it, so that a new version of it still changes the hash.
            source = ref.source
            where = [source.url, source.etag, source.version_id] if source is not None else []
            files.append([inp.name, ref.path, ref.hash, *where])
    return _sha256([datum_id, files, salt])


def job_datums(inp: Input, leaves: Sequence[Leaf]) -> Iterator[tuple[str, list[DatumInput]]]:
    """The datums a job of `inp` runs on `leaves`, with their ids, each id once.

    Only a union can give one datum twice (the same input under two of its branches); it is one
    piece of work, queued and counted once. Other inputs need no memory of the ids seen.
    The planner queues exactly these, and `datumflow list datum -f` shows them.
    """
    seen: set[bytes] | None = set() if _has_union(inp) else None
    for inputs in enumerate_datums(inp, leaves):
        did = datum_id(inputs)
        if seen is not None:
            digest = bytes.fromhex(did[:32])
            if digest in seen:
                continue
            seen.add(digest)
        yield did, inputs


def _has_union(inp: Input) -> bool:
    if inp.union is not None:
        return True
    children = inp.cross or inp.join or inp.group or []
    return any(_has_union(child) for child in children)
