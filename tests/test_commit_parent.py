"""A commit event's `parent` is the producer's claim of what it built on: an event whose parent is
not the branch's head (another producer committed meanwhile), or is no commit at all, is refused
to the planner's dead letters with both commits named, rather than applied on a head its
producer never saw."""

from __future__ import annotations

import msgspec
import nats
import pytest

from datumflow.broker import subjects
from datumflow.broker.messages import CommitEvent, DeadLetter, FileRef
from tests.helpers import Cluster, eventually

pytestmark = pytest.mark.asyncio


async def head_of(cluster: Cluster, repo: str) -> str:
    async with cluster.api() as api:
        head = await api.repos.head(repo, "master")
        return head.id if head else ""


async def test_two_producers_racing_on_one_parent_one_wins_one_is_dead_lettered(
    cluster: Cluster,
) -> None:
    async with cluster.api() as api:
        await api.repos.create_repo("shared")
        key, size = await api.store.put_bytes(b"base\n")
        base = await api.repos.commit_files(
            "shared", "master", puts=[FileRef(path="/base.txt", size=size, hash=key)]
        )
        refs = {}
        for who in ("alice", "bob"):
            key, size = await api.store.put_bytes(f"{who}\n".encode())
            refs[who] = FileRef(path=f"/{who}.txt", size=size, hash=key)
    nc = await nats.connect(cluster.server.url)
    try:
        js = nc.jetstream()
        dead = await js.subscribe(subjects.dead("planner"), durable="test-parent-dead")
        # Both built on `base`, neither saw the other's commit.
        for who, commit in (("alice", "a" * 32), ("bob", "b" * 32)):
            event = CommitEvent(
                repo="shared",
                branch="master",
                commit=commit,
                parent=base.id,
                files=[refs[who]],
                origin="external",
            )
            await js.publish(
                subjects.commit("shared"),
                msgspec.json.encode(event),
                headers={"Nats-Msg-Id": commit},
            )
        letter = msgspec.json.decode((await dead.next_msg(timeout=30)).data, type=DeadLetter)

        # The first event wins, on top of base; the second is refused naming the parent it
        # claimed and the head it found.
        async def landed() -> str | None:
            head = await head_of(cluster, "shared")
            return head if head != base.id else None

        winner = await eventually(landed, timeout=30, what="the first event's commit")
        assert winner == "a" * 32
        async with cluster.api() as api:
            info = await api.repos.inspect_commit("shared", winner)
            assert info.parent == base.id
            files = [f.path for f in await api.repos.files(info)]
            assert files == ["/alice.txt", "/base.txt"]
            assert await api.repos.commits.find(f"shared.{'b' * 32}") is None
        assert base.id in letter.reason and winner in letter.reason, letter.reason
        assert "b" * 32 in letter.reason, letter.reason

        # A parent that is no commit of the repo at all is refused too.
        ghost = CommitEvent(
            repo="shared",
            branch="master",
            commit="c" * 32,
            parent="f" * 32,
            files=[refs["bob"]],
            origin="external",
        )
        await js.publish(
            subjects.commit("shared"), msgspec.json.encode(ghost), headers={"Nats-Msg-Id": "c" * 32}
        )
        letter = msgspec.json.decode((await dead.next_msg(timeout=30)).data, type=DeadLetter)
        assert "f" * 32 in letter.reason and winner in letter.reason, letter.reason
        assert await head_of(cluster, "shared") == winner
    finally:
        await nc.close()
