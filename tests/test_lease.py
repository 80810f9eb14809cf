"""The lease (datumflow.broker.lease) and active/standby (datumflow.runtime.leader) on a real
nats-server: one holder at a time, a standby takes over once the holder stops renewing, a holder
that lost its lease knows it, and a committer that lost it writes nothing a newer one wrote."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import msgspec
import pytest

from datumflow.broker import subjects
from datumflow.broker.connection import Broker, connect
from datumflow.broker.kv import Records
from datumflow.broker.lease import ATTEMPT, RENEW_EVERY, Lease
from datumflow.broker.records import JobHead, JobInfo, LeaseInfo
from datumflow.broker.topology import LEASE_TTL
from datumflow.errors import Superseded
from datumflow.functions.committer import Committer
from datumflow.functions.tally import Tally
from datumflow.pfs.pipelines import job_key
from datumflow.runtime.embedded import EmbeddedServer
from datumflow.runtime.leader import lead
from datumflow.settings import Settings
from datumflow.storage import FileStore
from tests.helpers import eventually

pytestmark = pytest.mark.asyncio


async def _second(nats_server: EmbeddedServer) -> Broker:
    return await connect(settings=Settings(nats_url=nats_server.url), name="test-2")


async def test_one_holder_at_a_time_and_the_standby_takes_over_once_renewals_stop(
    broker: Broker, nats_server: EmbeddedServer
) -> None:
    other = await _second(nats_server)
    try:
        a, b = Lease(broker, name="committer"), Lease(other, name="committer")
        assert await a.acquire()
        assert a.held() and a.fence > 0
        assert not await b.acquire()
        for _ in range(3):  # renewed past the TTL: still a's
            await asyncio.sleep(LEASE_TTL / 3)
            assert await a.renew()
            assert not await b.acquire()
        # a stops renewing, as a dead or paused process does: b gets it within the TTL.
        stopped = time.monotonic()
        await eventually(b.acquire, timeout=LEASE_TTL + 3, interval=0.1, what="b to take over")
        gap = time.monotonic() - stopped
        assert LEASE_TTL - 1.5 < gap < LEASE_TTL + 2, gap
        assert b.fence > a.fence  # fences only grow
        # a knows it lost the lease, by its own clock and by the broker.
        assert not a.held()
        assert not await a.renew()
        with pytest.raises(Superseded):
            a.check()
        holder, _ = await Records(broker, bucket=subjects.LEASES_BUCKET, type=LeaseInfo).get(
            "committer"
        )
        assert holder.holder == b.holder
    finally:
        await other.close()


async def test_a_renewal_refused_means_lost_even_before_the_ttl(
    broker: Broker, nats_server: EmbeddedServer
) -> None:
    """The key rewritten by someone else (a standby that saw it expire while we were paused)."""
    a = Lease(broker, name="ingest")
    assert await a.acquire()
    kv = await broker.kv(subjects.LEASES_BUCKET)
    thief = LeaseInfo(holder="elsewhere:1/x", host="elsewhere", pid=1, since=time.time())
    await kv.put("ingest", msgspec.json.encode(thief))
    assert a.held()  # by the clock it would be
    assert not await a.renew()
    assert not a.held() and a.fence == 0


async def test_a_renewal_whose_answer_was_lost_is_recognised(broker: Broker) -> None:
    a = Lease(broker, name="committer")
    assert await a.acquire()
    fence = a.fence
    # The renewal reached the stream, its answer did not: the revision a remembers is stale.
    kv = await broker.kv(subjects.LEASES_BUCKET)
    entry = await kv.get("committer")
    assert entry.value is not None
    await kv.update("committer", entry.value, last=entry.revision)
    assert await a.renew()
    assert a.held() and a.fence == fence
    assert await a.renew()  # and the next one goes on from the right revision


async def test_a_renewal_that_finds_its_lost_one_does_not_outlast_the_key(
    broker: Broker, nats_server: EmbeddedServer
) -> None:
    """The lost renewal was dated by the server when it landed: a renewal made later that only
    recognises it must not count the lease from its own sending, or the holder would think it
    holds the lease after the key expired and a standby took it."""
    other = await _second(nats_server)
    try:
        a, b = Lease(broker, name="committer"), Lease(other, name="committer")
        assert await a.acquire()
        kv = await broker.kv(subjects.LEASES_BUCKET)
        entry = await kv.get("committer")
        assert entry.value is not None
        await kv.update("committer", entry.value, last=entry.revision)  # its answer lost
        await asyncio.sleep(2.0)  # the next renewal comes late, as under load
        assert await a.renew()
        await eventually(b.acquire, timeout=LEASE_TTL + 3, interval=0.05, what="b to take over")
        assert not a.held(), "a still counts on a lease b holds"
    finally:
        await other.close()


async def test_a_clean_stop_hands_over_at_once(broker: Broker, nats_server: EmbeddedServer) -> None:
    other = await _second(nats_server)
    try:
        a, b = Lease(broker, name="committer"), Lease(other, name="committer")
        assert await a.acquire()
        await a.release()
        assert not a.held()
        assert await b.acquire()
    finally:
        await other.close()


async def test_lead_runs_one_body_and_the_standby_takes_over_when_the_holder_goes(
    broker: Broker, nats_server: EmbeddedServer
) -> None:
    other = await _second(nats_server)
    running: list[str] = []
    stops = {"a": asyncio.Event(), "b": asyncio.Event()}

    def body(name: str):  # type: ignore[no-untyped-def]
        async def run(lease: Lease, term: asyncio.Event) -> None:
            running.append(name)
            try:
                await term.wait()
            finally:
                running.remove(name)

        return run

    first = asyncio.create_task(
        lead(lease=Lease(broker, name="committer"), stop=stops["a"], body=body("a"))
    )
    await eventually(lambda: running == ["a"], timeout=5, what="a active")
    second = asyncio.create_task(
        lead(lease=Lease(other, name="committer"), stop=stops["b"], body=body("b"))
    )
    try:
        await asyncio.sleep(LEASE_TTL + 1)
        assert running == ["a"]  # b stands by while a renews
        stops["a"].set()  # a clean stop releases the lease: b takes over at once
        await first
        began = time.monotonic()
        await eventually(lambda: running == ["b"], timeout=5, what="b active")
        assert time.monotonic() - began < 2
    finally:
        stops["a"].set()
        stops["b"].set()
        await asyncio.gather(first, second)
        await other.close()


async def test_one_stall_of_the_broker_does_not_cost_the_lease(
    broker: Broker, nats_server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A renewal that waits its whole ATTEMPT for an answer (the broker stalled: a GC pause, a
    disk flush) is followed at once by another, which gets through once the broker is back:
    the same replica stays active, under the same fence."""
    caplog.set_level(logging.WARNING, logger="datumflow")
    started: list[int] = []
    lease = Lease(broker, name="committer")

    async def body(held: Lease, term: asyncio.Event) -> None:
        started.append(held.fence)
        await term.wait()

    stop = asyncio.Event()
    leading = asyncio.create_task(lead(lease=lease, stop=stop, body=body))
    assert nats_server.process is not None
    pid = nats_server.process.pid
    try:
        await eventually(lambda: started, timeout=5, what="the lease taken")
        await asyncio.sleep(0.3)  # just after a renewal
        os.kill(pid, signal.SIGSTOP)
        try:
            await eventually(
                lambda: any(
                    "renewing the committer lease" in r.getMessage() for r in caplog.records
                ),
                timeout=ATTEMPT + RENEW_EVERY + 2,
                interval=0.01,
                what="a renewal to wait its whole attempt",
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(LEASE_TTL)  # past the end of the lease the stalled renewal left
        assert lease.held()
        assert started == [lease.fence], "the lease was lost and taken again"
        assert not [r for r in caplog.records if "lost" in r.getMessage()]
    finally:
        os.kill(pid, signal.SIGCONT)
        stop.set()
        await leading


async def test_a_committer_that_lost_its_lease_writes_no_job_a_newer_one_wrote(
    broker: Broker, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """A paused committer wakes after another took over: the job record carries the newer fence,
    and the stale committer stops instead of writing its (smaller) figures over it."""
    store = FileStore(tmp_path / "objects")
    old, new = Lease(broker, name="committer"), Lease(broker, name="committer-new")
    assert await old.acquire()
    assert await new.acquire()  # a later revision of the same bucket: a higher fence
    assert new.fence > old.fence
    committer = Committer(broker=broker, store=store, lease=old)
    jobs = committer.pipelines.jobs
    key = job_key("p", "j")
    record = JobInfo(
        pipeline="p", id="j", version=1, seq=1, state="running", created=1.0, fence=new.fence
    )
    await jobs.create(key, record)
    await committer.pipelines.heads.create("p", JobHead(pipeline="p", last_job="j"))
    tally = Tally()
    tally.total = 10
    committer.tallies[("p", "j")] = tally
    stop = asyncio.Event()
    committer._stop = stop
    with pytest.raises(Superseded):
        await committer._progress("p", "j")
    assert stop.is_set()
    assert (await jobs.get(key))[0] == record  # untouched
    # The lease itself gone stale (a pause past the TTL): nothing is written either.
    fresh = Committer(broker=broker, store=store, lease=Lease(broker, name="gone"))
    fresh.tallies[("p", "j")] = tally
    with pytest.raises(Superseded):
        await fresh._progress("p", "j")
    assert (await jobs.get(key))[0] == record


async def test_a_committer_that_lost_its_lease_removes_no_datum_of_a_later_job(
    broker: Broker, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """A committer paused in the middle of killing a job (its lease still good by its own clock)
    wakes after a newer one ended that job and the next job's datums were queued: it stops
    before removing them."""
    store = FileStore(tmp_path / "objects")
    old, new = Lease(broker, name="committer"), Lease(broker, name="committer-new")
    assert await old.acquire()
    assert await new.acquire()
    committer = Committer(broker=broker, store=store, lease=old)
    committer._stop = asyncio.Event()
    committer.tallies[("p", "j")] = Tally()  # counted before the pause
    ended = JobInfo(
        pipeline="p", id="j", version=1, seq=1, state="success", created=1.0, fence=new.fence
    )
    await committer.pipelines.jobs.create(job_key("p", "j"), ended)
    for n in range(3):  # the next job's datums
        await broker.publish(subjects.datum("p"), b"{}", msg_id=f"next:{n}")
    before = (await broker.js.stream_info(subjects.DATUMS_STREAM)).state.messages
    assert before == 3
    with pytest.raises(Superseded):
        await committer.kill("p", "j", why="timed out")
    assert (await broker.js.stream_info(subjects.DATUMS_STREAM)).state.messages == before
