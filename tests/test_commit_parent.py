"""A commit event's `parent` is the producer's claim of what it built on: an event whose parent is
not the branch's head (another producer committed meanwhile), or is no commit at all, is refused
to the planner's dead letters with both commits named, rather than applied on a head its
producer never saw."""

from __future__ import annotations

import asyncio

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


async def test_one_event_adopted_twice_at_once_is_one_commit_and_no_refusal(
    cluster: Cluster,
) -> None:
    """The planner adopts each event from two consumers at once (its own and each pipeline's),
    one a little behind the other: the later one must find the commit made, not refuse it as a
    parent that is no longer the head, nor withdraw the record the branch now points at."""
    async with cluster.api() as api:
        await api.repos.create_repo("twice")
        key, size = await api.store.put_bytes(b"base\n")
        head = await api.repos.commit_files(
            "twice", "master", puts=[FileRef(path="/base.txt", size=size, hash=key)]
        )

        async def later(event: CommitEvent, lag: float) -> object:
            await asyncio.sleep(lag)
            return await api.repos.adopt(event)

        # The second adoption lags by 0 to 15 ms: across the window in which the first has
        # recorded the commit and is moving the branch.
        for round_ in range(16):
            key, size = await api.store.put_bytes(f"{round_}\n".encode())
            event = CommitEvent(
                repo="twice",
                branch="master",
                commit=f"{round_:032d}",
                parent=head.id,
                files=[FileRef(path=f"/{round_}.txt", size=size, hash=key)],
                origin="external",
            )
            first, second = await asyncio.gather(
                api.repos.adopt(event), later(event, round_ / 1000)
            )
            assert first.id == second.id == event.commit  # type: ignore[attr-defined]
            info = await api.repos.inspect_commit("twice", event.commit)
            assert info.parent == head.id
            assert await head_of(cluster, "twice") == event.commit
            head = info
        assert len(await api.repos.files(head)) == 17
