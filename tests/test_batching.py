"""Datum sets: a worker takes several datums at once, keeps them all alive with one heartbeat,
and a worker killed in the middle of a set has the rest of it redelivered, each datum counted once.

The functions the pipelines call are defined here: the workers import `tests.test_batching`.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path

import msgspec
import pytest

from datumflow.broker import subjects
from datumflow.broker.messages import DatumResult, JobPlanned
from datumflow.broker.outbox import Outbox
from datumflow.errors import BrokerError
from datumflow.functions.worker.batch import MAX_SET, TARGET, BatchSizer
from datumflow.spec import DatumSetSpec
from datumflow.transform import Datum
from tests.helpers import (
    REPO_ROOT,
    Cluster,
    create_pipeline,
    datums_in_hand,
    eventually,
    output_files,
    put_files,
    results_of,
    wait_job_done,
)

# ----------------------------------------------------------------------- functions the workers call


def marked_copy(inputs: dict[str, Path], out: Path, *, datum: Datum) -> None:
    """Leave a mark (datum, process, set, attempt, when), take a while, copy the input."""
    name = f"{datum.id}.{os.getpid()}.{datum.batch}.{datum.attempt}.{time.time_ns()}"
    (Path(datum.env["MARKS"]) / name).touch()
    time.sleep(float(datum.env["SECONDS"]))
    source = inputs["in"]
    (out / source.name).write_bytes(source.read_bytes())


class Mark(msgspec.Struct, frozen=True):
    datum: str
    pid: int
    batch: int
    attempt: int
    at: int
    """time.time_ns() when the datum started."""


def marks_in(directory: Path) -> list[Mark]:
    """Every mark, in the order the datums started."""
    out = []
    for path in directory.iterdir():
        datum, pid, batch, attempt, at = path.name.split(".")
        out.append(Mark(datum, int(pid), int(batch), int(attempt), int(at)))
    return sorted(out, key=lambda m: m.at)


# ------------------------------------------------------------------------------- the set's size


def test_number_fixes_the_set_size() -> None:
    sizer = BatchSizer(DatumSetSpec(number=7), parallelism=3)
    assert sizer.size() == 7
    sizer.observe(datums=7, seconds=70.0, input_bytes=7)
    assert sizer.size() == 7
    assert BatchSizer(DatumSetSpec(number=10**6), parallelism=1).size() == MAX_SET


def test_per_worker_splits_what_is_pending() -> None:
    sizer = BatchSizer(DatumSetSpec(per_worker=2), parallelism=4)
    assert sizer.needs_pending
    assert sizer.size(pending=800) == 100  # 800 datums in 4 workers x 2 sets
    assert sizer.size(pending=3) == 1


def test_size_bytes_follows_the_bytes_seen() -> None:
    sizer = BatchSizer(DatumSetSpec(size_bytes=1000), parallelism=1)
    assert sizer.size() == 1
    sizer.observe(datums=4, seconds=0.1, input_bytes=400)
    assert sizer.size() == 10


def test_without_a_spec_a_set_holds_about_target_seconds() -> None:
    sizer = BatchSizer(None, parallelism=2)
    assert sizer.size() == 1  # nothing known yet
    for _ in range(20):
        sizer.observe(datums=100, seconds=0.05, input_bytes=0)  # 500 us each
    assert sizer.size() == int(TARGET / 0.0005) < MAX_SET
    for _ in range(20):
        sizer.observe(datums=1, seconds=1.0, input_bytes=0)  # a second each: one at a time
    assert sizer.size() == 1


def test_a_jobs_last_datums_are_shared_among_the_workers() -> None:
    """Near a job's end the sets shrink, so that one worker does not take a whole set of the
    last datums while the others sit idle."""
    sizer = BatchSizer(None, parallelism=2)
    for _ in range(20):
        sizer.observe(datums=20, seconds=0.2, input_bytes=0)  # 10 ms each: sets of 20
    assert sizer.size() == 20
    sizer.waiting(1000)
    assert sizer.size() == 20
    sizer.waiting(30)
    assert sizer.size() == 15
    sizer.waiting(3)
    assert sizer.size() == 2
    sizer.waiting(0)
    assert sizer.size() == 1
    sizer.waiting(None)  # not known: as many as the time target says
    assert sizer.size() == 20


def test_a_command_takes_one_datum_at_a_time_unless_told() -> None:
    sizer = BatchSizer(None, parallelism=2, adaptive=False)
    sizer.observe(datums=100, seconds=0.01, input_bytes=0)
    assert sizer.size() == 1
    assert BatchSizer(DatumSetSpec(number=3), parallelism=2, adaptive=False).size() == 3


# -------------------------------------------------------------------------------------- end to end


async def _marked_pipeline(
    cluster: Cluster, tmp_path: Path, marks: Path, *, files: int, seconds: float, **spec: object
) -> dict[str, bytes]:
    data = {f"/f{i:02d}": f"datum {i}\n".encode() for i in range(files)}
    await put_files(cluster, "in", data)
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "sets"},
            "input": {"pfs": {"repo": "in", "glob": "/*"}},
            "transform": {
                "function": "tests.test_batching:marked_copy",
                "env": {"MARKS": str(marks), "SECONDS": str(seconds)},
            },
            **spec,
        },
    )
    return data


@pytest.mark.asyncio
async def test_sets_of_number_kept_alive_together(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A set of five datums of 0.5 s takes 2.5 s, over twice ack_wait: only heartbeats for the
    # whole set keep its last datums from being redelivered while they wait their turn.
    cluster = make_cluster(PYTHONPATH=str(REPO_ROOT), DATUMFLOW_ACK_WAIT="1")
    marks = tmp_path / "marks"
    marks.mkdir()
    data = await _marked_pipeline(
        cluster, tmp_path, marks, files=10, seconds=0.5, datum_set_spec={"number": 5}
    )
    [job] = await wait_job_done(cluster, "sets", timeout=90)
    assert job.state == "success", job.reason
    assert (job.data_total, job.data_processed, job.data_failed) == (10, 10, 0)
    assert await output_files(cluster, "sets") == data
    found = marks_in(marks)
    assert len(found) == 10 and len({m.datum for m in found}) == 10  # each datum ran once
    sets = Counter((m.pid, m.batch) for m in found)
    assert max(sets.values()) == 5 and all(n <= 5 for n in sets.values()), sets
    assert {r.attempts for r in await results_of(cluster, "sets")} == {1}


@pytest.mark.asyncio
async def test_worker_killed_in_the_middle_of_a_set(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(PYTHONPATH=str(REPO_ROOT), DATUMFLOW_ACK_WAIT="2")
    marks = tmp_path / "marks"
    marks.mkdir()
    data = await _marked_pipeline(
        cluster,
        tmp_path,
        marks,
        files=20,
        seconds=0.4,
        datum_set_spec={"number": 5},
        parallelism_spec={"constant": 2},
    )

    async def second_datum_of_a_set() -> Mark | None:
        by_set = defaultdict(list)
        for m in marks_in(marks):
            by_set[(m.pid, m.batch)].append(m)
        # The later of the two is the datum in hand.
        return next((ms[-1] for ms in by_set.values() if len(ms) >= 2), None)

    # Kill the worker while it runs the second datum of a set: the first is done, three wait.
    victim = await eventually(second_datum_of_a_set, timeout=60, what="a set's second datum")
    os.kill(victim.pid, signal.SIGKILL)

    [job] = await wait_job_done(cluster, "sets", timeout=90)
    assert job.state == "success", job.reason
    assert (job.data_total, job.data_processed, job.data_failed) == (20, 20, 0)
    assert await output_files(cluster, "sets") == data

    # One result per datum: a redone datum is counted once.
    results = await results_of(cluster, "sets")
    assert sorted(r.datum for r in results) == sorted({r.datum for r in results})
    assert len(results) == 20
    redelivered = {r.datum for r in results if r.attempts >= 2}
    killed_set = [m for m in marks_in(marks) if (m.pid, m.batch) == (victim.pid, victim.batch)]
    started_there = {m.datum for m in killed_set}
    assert len(started_there) == 2
    # The datum in hand and the three that never started came back; the first one may have
    # come back too (if the kill beat its ack), no other did.
    assert victim.datum in redelivered
    never_started = redelivered - started_there
    assert len(never_started) == 3, (redelivered, started_there)
    assert redelivered <= started_there | never_started
    # ... and each of the three ran once, elsewhere.
    runs = Counter(m.datum for m in marks_in(marks))
    assert all(runs[d] == 1 for d in never_started)
    assert all(m.pid != victim.pid for m in marks_in(marks) if m.datum in never_started)
    assert runs[victim.datum] == 2


# ---------------------------------------------------------------------------------- the outbox


@pytest.mark.asyncio
async def test_outbox_stores_each_message_once_and_says_what_it_could_not(broker) -> None:  # type: ignore[no-untyped-def]
    outbox = Outbox(broker, window=8)
    settled: list[tuple[int, bool]] = []

    def note(i: int):  # type: ignore[no-untyped-def]
        async def then(stored: bool) -> None:
            settled.append((i, stored))

        return then

    subject = subjects.dead("outbox-test")
    for i in range(100):
        # Every message twice: the second is a duplicate by its Nats-Msg-Id.
        for _ in range(2):
            planned = JobPlanned(pipeline="p", job="j", data_total=i)
            await outbox.publish(subject, planned, msg_id=f"outbox:{i}", then=note(i))
    await outbox.publish("no.stream.listens.here", b"x", msg_id="lost", then=note(-1))
    await outbox.flush()
    assert settled == [(i, True) for i in range(100) for _ in range(2)] + [(-1, False)]
    info = await broker.js.stream_info(subjects.DEAD_STREAM, subjects_filter=subject)
    assert info.state.messages == 100

    # Without a `then`, flush is where a message that could not be stored is heard of.
    await outbox.publish("no.stream.listens.here", b"x", msg_id="lost-again")
    with pytest.raises(BrokerError, match="1 messages could not be stored"):
        await outbox.flush()


# ------------------------------------------------------------------------------- the reporter


@pytest.mark.asyncio
async def test_results_handed_over_together_travel_together_and_ack_their_datums(
    broker, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from datumflow.functions.worker.batch import Heartbeat
    from datumflow.functions.worker.reporter import Reporter
    from datumflow.pfs import results
    from datumflow.storage import FileStore

    puller, msgs = await datums_in_hand(broker, "rep", 5)
    heartbeat = Heartbeat(every=10)
    heartbeat.hold(msgs)
    reporter = Reporter(broker, heartbeat, store=FileStore(tmp_path / "store"))
    jobs = ["job-a", "job-a", "job-a", "job-b", "job-a"]
    for i, (msg, job) in enumerate(zip(msgs, jobs, strict=True)):
        # One step of the loop: nothing awaited between the hand-overs.
        reporter.report(msg, DatumResult(pipeline="rep", job=job, datum=f"d{i}", state="success"))
    await reporter.close()
    await heartbeat.close()
    await puller.close()

    # Three messages: job-a's first three together, job-b's one alone, job-a's last alone.
    info = await broker.js.stream_info(subjects.RESULTS_STREAM)
    assert info.state.messages == 3
    a = results.first_results(await results.replay(broker, "rep", "job-a"))
    b = results.first_results(await results.replay(broker, "rep", "job-b"))
    assert sorted(a) == ["d0", "d1", "d2", "d4"] and sorted(b) == ["d3"]
    # Every datum acked once its result was stored: the work queue is empty, nothing in hand.
    consumer = await broker.js.consumer_info(
        subjects.DATUMS_STREAM, subjects.worker_consumer("rep")
    )
    assert (consumer.num_pending, consumer.num_ack_pending) == (0, 0)
    assert len(heartbeat) == 0
