"""Repos, branches and commits over a real JetStream KV and the file store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from datumflow.broker.connection import Broker
from datumflow.broker.messages import CommitEvent, FileRef
from datumflow.errors import Conflict, NotFound, PermanentError
from datumflow.pfs import manifest
from datumflow.pfs.paths import BadPath, clean_path, parse_address, parse_job
from datumflow.pfs.repos import Repos
from datumflow.storage.file import FileStore


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "objects")


async def refs(store: FileStore, files: dict[str, bytes]) -> list[FileRef]:
    out = []
    for path, data in files.items():
        key, size = await store.put_bytes(data)
        out.append(FileRef(path=path, size=size, hash=key))
    return out


async def contents(repos: Repos, repo: str, ref: str = "master") -> dict[str, bytes]:
    info = await repos.inspect_commit(repo, ref)
    return {
        f.path: await repos.store.get_bytes(f.hash)
        for f in await manifest.read(repos.store, info.manifest)
    }


@pytest.mark.asyncio
async def test_commits_build_on_their_parent(broker: Broker, store: FileStore) -> None:
    repos = Repos(broker=broker, store=store)
    await repos.create_repo("data")
    first = await repos.commit_files(
        "data", "master", puts=await refs(store, {"/a": b"1", "/d/b": b"2", "/d/c": b"3"})
    )
    second = await repos.commit_files(
        "data", "master", puts=await refs(store, {"/a": b"changed"}), deletes=["/d"]
    )
    assert second.parent == first.id
    assert await contents(repos, "data") == {"/a": b"changed"}
    assert await contents(repos, "data", first.id) == {"/a": b"1", "/d/b": b"2", "/d/c": b"3"}
    assert [c.id for c in await repos.list_commits("data")] == [second.id, first.id]
    assert (second.files, second.size_bytes) == (1, 7)


@pytest.mark.asyncio
async def test_concurrent_commits_to_one_branch_all_land(broker: Broker, store: FileStore) -> None:
    repos = Repos(broker=broker, store=store)
    await repos.create_repo("busy")
    puts = [await refs(store, {f"/f{i}": str(i).encode()}) for i in range(8)]
    await asyncio.gather(*(repos.commit_files("busy", "master", puts=p) for p in puts))
    # Compare-and-set on the branch head: no commit lost another's file.
    assert await contents(repos, "busy") == {f"/f{i}": str(i).encode() for i in range(8)}
    assert len(await repos.list_commits("busy")) == 8


@pytest.mark.asyncio
async def test_a_file_cannot_also_be_a_directory(broker: Broker, store: FileStore) -> None:
    repos = Repos(broker=broker, store=store)
    await repos.create_repo("clash")
    await repos.commit_files("clash", "master", puts=await refs(store, {"/x": b"file"}))
    with pytest.raises(PermanentError, match="/x is a file"):
        await repos.commit_files(
            "clash", "master", puts=await refs(store, {"/x/y": b"under a file"})
        )
    assert await contents(repos, "clash") == {"/x": b"file"}


@pytest.mark.asyncio
async def test_unknown_and_duplicate_repos_are_refused(broker: Broker, store: FileStore) -> None:
    repos = Repos(broker=broker, store=store)
    with pytest.raises(NotFound, match="repo nope does not exist"):
        await repos.commit_files("nope", "master", puts=[])
    await repos.create_repo("once")
    with pytest.raises(Conflict, match="already exists"):
        await repos.create_repo("once")
    with pytest.raises(BadPath, match="invalid"):
        await repos.create_repo("bad name!")


@pytest.mark.asyncio
async def test_adopting_an_external_commit_is_idempotent(broker: Broker, store: FileStore) -> None:
    repos = Repos(broker=broker, store=store)
    await repos.create_repo("ext")
    files = await refs(store, {"/in.txt": b"hello"})
    event = CommitEvent(repo="ext", commit="c" * 32, files=files)
    first, second = await asyncio.gather(repos.adopt(event), repos.adopt(event))
    assert first.id == second.id == "c" * 32
    assert await contents(repos, "ext") == {"/in.txt": b"hello"}
    assert len(await repos.list_commits("ext")) == 1


@pytest.mark.asyncio
async def test_adopting_refuses_missing_objects_and_escaping_paths(
    broker: Broker, store: FileStore
) -> None:
    repos = Repos(broker=broker, store=store)
    await repos.create_repo("ext")
    missing = CommitEvent(
        repo="ext", commit="d" * 32, files=[FileRef(path="/a", size=1, hash="0" * 64)]
    )
    with pytest.raises(PermanentError, match="not in the store"):
        await repos.adopt(missing)
    [ref] = await refs(store, {"/a": b"a"})
    escaping = CommitEvent(
        repo="ext", commit="e" * 32, files=[FileRef(path="/../etc/passwd", size=1, hash=ref.hash)]
    )
    with pytest.raises(BadPath, match=r"'\.\.'"):
        await repos.adopt(escaping)
    assert await repos.head("ext", "master") is None


@pytest.mark.parametrize(
    ("text", "repo", "ref", "path"),
    [
        ("images", "images", "master", "/"),
        ("images@dev", "images", "dev", "/"),
        ("images@master:/a/b.png", "images", "master", "/a/b.png"),
        ("images@master:a//b/./c", "images", "master", "/a/b/c"),
    ],
)
def test_addresses(text: str, repo: str, ref: str, path: str) -> None:
    address = parse_address(text)
    assert (address.repo, address.ref, address.path) == (repo, ref, path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("images@master:/a/../../etc", "'..'"),
        ("images@", "nothing after '@'"),
        ("bad repo@master:/x", "invalid"),
        ("images@master:/a\x00b", "NUL"),
        ("images@master:/" + "x" * 300, "longer than 255"),
    ],
)
def test_bad_addresses_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(BadPath, match=message):
        parse_address(text)


def test_clean_path_and_job_addresses() -> None:
    assert clean_path("") == "/"
    assert clean_path("a/b/") == "/a/b"
    assert parse_job("edges@0123abcd") == ("edges", "0123abcd")
    with pytest.raises(BadPath, match="PIPELINE@JOB"):
        parse_job("edges")
