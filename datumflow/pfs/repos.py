"""Repos, branches and commits: records in KV, file lists as manifests in the object store.

A commit is immutable: its record is created once (create-only) and the branch head moves to it by
compare-and-set. Every finished commit is announced on `df.commit.<repo>`, which is what makes
pipelines run.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.kv import Records
from datumflow.broker.messages import CommitEvent, CommitRef, FileRef, ObjectSource, Origin
from datumflow.broker.records import BranchInfo, CommitInfo, RepoInfo
from datumflow.errors import BranchMoved, Conflict, NotFound, PermanentError
from datumflow.pfs import manifest
from datumflow.pfs.paths import check_name, clean_path
from datumflow.storage.base import ObjectStore, reads_in_place

COMMIT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def new_commit_id() -> str:
    return uuid.uuid4().hex


class Repos:
    def __init__(self, *, broker: Broker, store: ObjectStore) -> None:
        self.broker = broker
        self.store = store
        self.repos = Records(broker, bucket=subjects.REPOS_BUCKET, type=RepoInfo)
        self.branches = Records(broker, bucket=subjects.BRANCHES_BUCKET, type=BranchInfo)
        self.commits = Records(broker, bucket=subjects.COMMITS_BUCKET, type=CommitInfo)

    # -- repos -------------------------------------------------------------------------------

    async def create_repo(
        self, name: str, *, description: str = "", pipeline: str = ""
    ) -> RepoInfo:
        check_name(name)
        info = RepoInfo(name=name, created=time.time(), description=description, pipeline=pipeline)
        if not await self.repos.create(name, info):
            existing = await self.get_repo(name)
            if pipeline and existing.pipeline == pipeline:
                return existing
            raise Conflict(f"repo {name} already exists")
        return info

    async def get_repo(self, name: str) -> RepoInfo:
        check_name(name)
        info = await self.repos.find(name)
        if info is None:
            raise NotFound(
                f"repo {name} does not exist: create it with `datumflow create repo {name}`"
            )
        return info

    async def list_repos(self) -> list[RepoInfo]:
        return await self.repos.all()

    async def delete_repo(self, name: str) -> None:
        await self.get_repo(name)
        for key in await self.branches.keys(f"{name}."):
            await self.branches.delete(key)
        for key in await self.commits.keys(f"{name}."):
            await self.commits.delete(key)
        await self.repos.delete(name)

    # -- commits -----------------------------------------------------------------------------

    async def head(self, repo: str, branch: str) -> CommitInfo | None:
        found = await self.branches.find(f"{repo}.{branch}")
        if found is None:
            return None
        return await self.commits.find(f"{repo}.{found.head}")

    async def inspect_commit(self, repo: str, ref: str) -> CommitInfo:
        """`ref` is a branch name or a commit id."""
        await self.get_repo(repo)
        info = await self.head(repo, ref)
        if info is None:
            info = await self.commits.find(f"{repo}.{ref}")
        if info is None:
            raise NotFound(f"{repo}@{ref}: no such branch or commit")
        return info

    async def list_commits(
        self, repo: str, branch: str = "master", *, limit: int = 0
    ) -> list[CommitInfo]:
        await self.get_repo(repo)
        out: list[CommitInfo] = []
        info = await self.head(repo, branch)
        while info is not None and (not limit or len(out) < limit):
            out.append(info)
            info = await self.commits.find(f"{repo}.{info.parent}") if info.parent else None
        return out

    async def files(self, info: CommitInfo | None) -> list[FileRef]:
        return [] if info is None else await manifest.read(self.store, info.manifest)

    async def commit_files(
        self,
        repo: str,
        branch: str,
        *,
        puts: Iterable[FileRef] = (),
        deletes: Iterable[str] = (),
        replace: bool = False,
        origin: Origin = "user",
        provenance: list[CommitRef] | None = None,
        commit_id: str = "",
        job: str = "",
        announce: bool = True,
        parent: str | None = None,
    ) -> CommitInfo:
        """Make a commit on `branch` from its head plus `puts` minus `deletes` (a deleted
        directory takes its subtree), or exactly `puts` with `replace`. Returns the new commit,
        which is announced before this returns.

        With `parent`, the commit is made only on that head: when the branch has moved on (or
        `parent` is no commit of the repo) it raises PermanentError naming both, instead of
        applying changes computed against one head on top of another."""
        await self.get_repo(repo)
        check_name(branch, what="branch")
        puts = list(puts)
        deletes = [clean_path(d) for d in deletes]
        started = time.time()
        branch_key = f"{repo}.{branch}"
        if commit_id and (landed := await self.commits.find(f"{repo}.{commit_id}")):
            # A retry after a crash: the record exists; finish moving the branch if we had not.
            if await self._move_head(branch_key, landed) and announce:
                await self.announce(landed)
            return landed
        while True:
            try:
                current, revision = await self.branches.get(branch_key)
                base = await self.commits.find(f"{repo}.{current.head}")
            except NotFound:
                current, revision, base = None, 0, None
            if commit_id and base is not None and base.id == commit_id:
                # Another consumer of the same event made this very commit meanwhile: done.
                return base
            if parent is not None:
                await self._check_parent(repo, branch, commit_id, parent, base)
            files = {} if replace else {f.path: f for f in await self.files(base)}
            for path in deletes:
                files.pop(path, None)
                prefix = path.rstrip("/") + "/"
                for p in [p for p in files if p.startswith(prefix)]:
                    del files[p]
            for ref in puts:
                files[ref.path] = ref
            ordered = [files[p] for p in sorted(files)]
            _check_no_file_under_file(ordered)
            key = await manifest.write(self.store, ordered)
            info = CommitInfo(
                repo=repo,
                id=commit_id or new_commit_id(),
                branch=branch,
                parent=base.id if base else "",
                manifest=key,
                size_bytes=sum(f.size for f in ordered),
                files=len(ordered),
                origin=origin,
                provenance=provenance or [],
                started=started,
                finished=time.time(),
                job=job,
            )
            if not await self.commits.create(f"{repo}.{info.id}", info):
                # Another consumer of the same event recorded this very commit first.
                landed, _ = await self.commits.get(f"{repo}.{info.id}")
                await self._move_head(branch_key, landed)
                return landed
            head = BranchInfo(repo=repo, name=branch, head=info.id)
            try:
                if current is None:
                    if not await self.branches.create(branch_key, head):
                        continue
                else:
                    await self.branches.swap(branch_key, head, revision=revision)
            except Conflict:
                if parent is not None and await self._head_id(branch_key) != info.id:
                    # Our record names a head that is gone: withdraw it, so that the refusal
                    # below leaves no commit behind that no branch will ever reach. (When the
                    # branch is at this very commit, another consumer of the same event moved
                    # it there from our record: the record stays, and the loop returns it.)
                    await self.commits.delete(f"{repo}.{info.id}")
                continue  # someone else committed first: rebase on their head
            if announce:
                await self.announce(info)
            return info

    async def _check_parent(
        self, repo: str, branch: str, commit_id: str, expected: str, head: CommitInfo | None
    ) -> None:
        if (head.id if head is not None else "") == expected:
            return  # "" names the empty branch
        what = f"commit {repo}@{commit_id}" if commit_id else f"a commit on {repo}@{branch}"
        now = f"{repo}@{branch} is at {head.id}" if head else f"{repo}@{branch} has no commit"
        # "" (the empty branch) is a state the producer saw, never a commit to look up: the key
        # would not even be a valid one ("repo.").
        if expected and await self.commits.find(f"{repo}.{expected}") is None:
            raise PermanentError(
                f"{what} names parent {expected}, which is no commit of {repo}; {now}. Build"
                " on the branch's head, and name it as the parent"
            )
        raise BranchMoved(
            f"{what} names parent {expected}, but {now}: another commit landed since its"
            " producer read the branch. Its changes were not applied; build them again on"
            f" {head.id if head else 'the empty branch'} and send a new event with that parent"
        )

    async def _head_id(self, branch_key: str) -> str:
        try:
            current, _ = await self.branches.get(branch_key)
        except NotFound:
            return ""
        return current.head

    async def _move_head(self, branch_key: str, info: CommitInfo) -> bool:
        """Point the branch at `info` if it still points at its parent; True if we moved it."""
        head = BranchInfo(repo=info.repo, name=info.branch, head=info.id)
        while True:
            try:
                current, revision = await self.branches.get(branch_key)
            except NotFound:
                if info.parent:
                    return False
                if await self.branches.create(branch_key, head):
                    return True
                continue
            if current.head != info.parent:
                return False
            try:
                await self.branches.swap(branch_key, head, revision=revision)
                return True
            except Conflict:
                continue

    async def announce(self, info: CommitInfo) -> None:
        event = CommitEvent(
            repo=info.repo,
            branch=info.branch,
            commit=info.id,
            parent=info.parent,
            manifest=info.manifest,
            origin=info.origin,
            provenance=info.provenance,
        )
        await self.broker.publish(subjects.commit(info.repo), event, msg_id=info.id)

    async def adopt(self, event: CommitEvent) -> CommitInfo:
        """Record a commit announced by a producer outside datumflow. Idempotent: every consumer
        of the event may call it, and the first one records it."""
        what = f"commit event for {event.repo}@{event.commit}"
        check_name(event.repo)
        if not COMMIT_ID_RE.match(event.commit):
            raise PermanentError(f"{what}: the commit id must be 1-128 letters, digits, '_' or '-'")
        existing = await self.commits.find(f"{event.repo}.{event.commit}")
        if existing is not None:
            return existing
        if event.manifest or event.files is None:
            raise PermanentError(
                f"commit event for {event.repo}@{event.commit}: no such commit is recorded, and"
                " the event lists no `files`; an external producer must list the commit's files"
            )
        await self.get_repo(event.repo)
        puts = []
        for ref in event.files:
            path = clean_path(ref.path)
            if ref.size < 0:
                raise PermanentError(f"{what}: {path} has a negative size ({ref.size})")
            if ref.source is not None:
                self._check_source(what, path, ref.source)
            elif not ref.hash or not await self.store.exists(ref.hash):
                raise PermanentError(
                    f"{what}: {path} refers to object {ref.hash or '(no hash)'}, which is not in"
                    " the store; upload it first or give a `source`"
                )
            puts.append(FileRef(path=path, size=ref.size, hash=ref.hash, source=ref.source))
        return await self.commit_files(
            event.repo,
            event.branch,
            puts=puts,
            deletes=event.deleted,
            replace=not event.parent,
            origin=event.origin if event.origin != "pipeline" else "external",
            provenance=event.provenance,
            commit_id=event.commit,
            announce=False,
            # The producer computed `files`/`deleted` against this head: apply them there only.
            parent=event.parent or None,
        )

    def _check_source(self, what: str, path: str, source: ObjectSource) -> None:
        """A file referenced in place must name an object, and the workers must reach it."""
        bucket, _, key = source.url.removeprefix("s3://").partition("/")
        if not source.url.startswith("s3://") or not bucket or not key or key.endswith("/"):
            raise PermanentError(
                f"{what}: {path} has source {source.url!r}; give s3://bucket/key of an object"
            )
        if not reads_in_place(self.store):
            raise PermanentError(
                f"{what}: {path} is read in place from {source.url}, but this datumflow stores"
                f" its objects at {self.store.url}, so its workers cannot read buckets; run it"
                " with --storage s3://BUCKET/PREFIX, or upload the file and give its `hash`"
            )


def _check_no_file_under_file(ordered: list[FileRef]) -> None:
    paths = {f.path for f in ordered}
    for f in ordered:
        parent = f.path.rsplit("/", 1)[0]
        while parent:
            if parent in paths:
                raise PermanentError(f"{f.path}: {parent} is a file, so it cannot be a directory")
            parent = parent.rsplit("/", 1)[0]
