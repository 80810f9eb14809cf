"""Set messages: an in-process function's datums travel several to a message, and each datum of
one is still run, reported, retried and given up on its own.

The planner's side (functions.datum_sets) and the worker's (broker.set_parts) on a real
nats-server; then whole jobs through `datumflow up`. The function the pipelines call is defined
here: the workers import `tests.test_set_messages`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError
from nats.js.errors import NotFoundError

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.consumer import Unusable
from datumflow.broker.messages import DatumInput, DatumTask, FileRef
from datumflow.broker.outbox import Outbox
from datumflow.broker.pull import Puller
from datumflow.broker.set_parts import Part, SetParts
from datumflow.broker.topology import ensure_pipeline_consumers
from datumflow.functions.datum_sets import SET_DATUMS, Packer, fixed_sets, set_size
from datumflow.functions.max_deliveries import give_up_datum
from datumflow.functions.worker.handback import attempt_of
from datumflow.functions.worker.tasks import datum_task
from datumflow.pfs import results
from datumflow.spec import load_spec
from datumflow.transform import Datum
from tests.helpers import (
    REPO_ROOT,
    create_pipeline,
    eventually,
    put_files,
    results_of,
    wait_job_done,
)

# ----------------------------------------------------------------------- functions the workers call


def fails_first_try_of_f3(inputs: dict[str, Path], out: Path, *, datum: Datum) -> None:
    """Copy the input; the datum of /f3 fails its first attempt."""
    source = inputs["in"]
    if source.name == "f3" and datum.attempt == 1:
        raise RuntimeError("f3 fails its first attempt")
    (out / source.name).write_bytes(source.read_bytes())


# ------------------------------------------------------------------------------------ helpers


def _spec(pipeline: str, **transform: object) -> str:
    return json.dumps(
        {
            "pipeline": {"name": pipeline},
            "input": {"pfs": {"repo": "in", "glob": "/*"}},
            "transform": transform or {"function": "tests.test_set_messages:fails_first_try_of_f3"},
            "parallelism_spec": {"constant": 2},
        }
    )


def _task(pipeline: str, n: int) -> DatumTask:
    ref = FileRef(path=f"/f{n}", size=1, hash="ab" * 32)
    return DatumTask(
        pipeline=pipeline,
        version=1,
        job="job1",
        datum=f"d{n}",
        hash=f"h{n}",
        inputs=[DatumInput(name="in", repo="in", branch="master", commit="c1", files=[ref])],
    )


async def _queued(broker: Broker, pipeline: str) -> list[DatumTask]:
    """Each message queued for `pipeline` now, decoded, in order (read by sequence: a work queue
    takes no second consumer)."""
    state = (await broker.js.stream_info(subjects.DATUMS_STREAM)).state
    out: list[DatumTask] = []
    for seq in range(state.first_seq, state.last_seq + 1):
        try:
            raw = await broker.js.get_msg(subjects.DATUMS_STREAM, seq)
        except NotFoundError:
            continue  # acked, or another pipeline's and removed
        if raw.subject == subjects.datum(pipeline):
            assert raw.data is not None
            out.append(msgspec.json.decode(raw.data, type=DatumTask))
    return out


async def _pack(
    broker: Broker, pipeline: str, count: int, *, size: int, shrink: bool = True
) -> None:
    publisher = Outbox(broker)
    packer = Packer(publisher, pipeline=pipeline, size=size, workers=2, shrink=shrink)
    for n in range(count):
        task = _task(pipeline, n)
        await packer.add(task, msgspec.json.encode(task))
    await packer.finish()
    await publisher.flush()


async def _publish_set(broker: Broker, pipeline: str, count: int) -> None:
    """One set message of `count` datums, as the planner sends one."""
    tasks = [_task(pipeline, n) for n in range(count)]
    whole = msgspec.structs.replace(tasks[0], more=tasks[1:])
    await broker.publish(subjects.datum(pipeline), whole, msg_id=f"job1:set:d0:{count}")


@contextlib.asynccontextmanager
async def _in_hand(
    broker: Broker, pipeline: str, count: int, *, beat_every: float = 0.2
) -> AsyncIterator[tuple[Puller, SetParts, list[Msg]]]:
    """One set message of `count` datums queued for `pipeline`, fetched and split as a worker
    fetches and splits one: the puller, the splitter and the parts."""
    await ensure_pipeline_consumers(broker, load_spec(_spec(pipeline)), ack_wait=30)
    await _publish_set(broker, pipeline, count)
    puller = Puller(
        broker, stream=subjects.DATUMS_STREAM, durable=subjects.worker_consumer(pipeline)
    )
    parts = SetParts(broker, beat_every=beat_every)
    try:
        msgs = await puller.fetch(batch=10, wait=5)
        assert len(msgs) == 1
        yield puller, parts, parts.split(msgs)
    finally:
        await parts.close()
        await puller.close()


async def _held(broker: Broker, pipeline: str) -> tuple[int, int]:
    info = await broker.js.consumer_info(subjects.DATUMS_STREAM, subjects.worker_consumer(pipeline))
    return info.num_pending, info.num_ack_pending


async def _until_held(
    broker: Broker, pipeline: str, expected: tuple[int, int], *, what: str
) -> None:
    """Until the worker consumer holds `expected`: (messages waiting, delivered and unacked)."""

    async def reached() -> bool:
        return await _held(broker, pipeline) == expected

    await eventually(reached, what=what)


# ------------------------------------------------------------------------------ the planner's side


def test_only_in_process_functions_get_sets() -> None:
    assert set_size(load_spec(_spec("f"))) == SET_DATUMS
    assert set_size(load_spec(_spec("c", cmd=["true"]))) == 1
    spec = json.loads(_spec("n"))
    spec["datum_set_spec"] = {"number": 40}
    assert set_size(load_spec(json.dumps(spec))) == 40  # the spec's sets, one message each
    assert fixed_sets(load_spec(json.dumps(spec)))
    assert not fixed_sets(load_spec(_spec("f")))


@pytest.mark.asyncio
async def test_a_jobs_datums_go_in_sets_that_shrink_to_one_at_its_end(broker: Broker) -> None:
    await _pack(broker, "packed", 300, size=16)
    queued = await _queued(broker, "packed")
    sizes = [1 + len(t.more) for t in queued]
    datums = [d.datum for t in queued for d in (t, *t.more)]
    assert datums == [f"d{n}" for n in range(300)]  # every datum once, in the planner's order
    assert max(sizes) == 16 and sizes[0] == 16
    assert sizes == sorted(sizes, reverse=True)  # the end of the job in ever smaller sets
    assert sizes[-4:] == [1, 1, 1, 1]  # the last datums one to a message, for every worker
    assert all(not d.more for t in queued for d in t.more)

    # Sets of a spec's `number`: all of that size but the last.
    await _pack(broker, "fixed", 30, size=8, shrink=False)
    assert [1 + len(t.more) for t in await _queued(broker, "fixed")] == [8, 8, 8, 6]

    # A command's datums: one a message, as before.
    await _pack(broker, "single", 20, size=1)
    queued = await _queued(broker, "single")
    assert [t.datum for t in queued] == [f"d{n}" for n in range(20)]
    assert not any(t.more for t in queued)


# ------------------------------------------------------------------------------- the worker's side


@pytest.mark.asyncio
async def test_a_set_message_is_acked_once_each_of_its_datums_is(broker: Broker) -> None:
    async with _in_hand(broker, "acks", 3, beat_every=1.0) as (_, parts, held):
        assert [p.task.datum for p in held if isinstance(p, Part)] == ["d0", "d1", "d2"]
        assert parts.per_message == 3
        # Each part is a datum message of its own to the worker: its data, its id, its delivery.
        assert datum_task(held[1].data) == _task("acks", 1)
        assert held[1].headers == {"Nats-Msg-Id": "job1:d1"}
        assert attempt_of(held[1], _task("acks", 1)) == 1

        await held[0].ack()
        await held[2].term()
        await broker.nc.flush()
        assert await _held(broker, "acks") == (0, 1)  # one datum unsettled: the message is held
        await held[1].ack()
        await _until_held(broker, "acks", (0, 0), what="the set message acked")
        with pytest.raises(MsgAlreadyAckdError):
            await held[1].ack()


@pytest.mark.asyncio
async def test_a_datum_of_a_set_that_fails_goes_again_alone_its_attempt_counted(
    broker: Broker,
) -> None:
    async with _in_hand(broker, "again", 3) as (puller, _, (first, failed, last)):
        await first.ack()
        await last.ack()
        await failed.nak(delay=1.0)  # as a failed attempt with tries left is nak'ed
        await broker.nc.flush()
        # Until the delay is over the set is held (and kept alive), and the datum not queued again.
        assert await _held(broker, "again") == (0, 1)

        async def queued_again() -> list[DatumTask]:
            return [t for t in await _queued(broker, "again") if not t.more]

        [again] = await eventually(queued_again, timeout=10, what="the failed datum queued again")
        assert (again.datum, again.tries, again.more) == ("d1", 1, [])
        # Its next delivery is its second attempt.
        [redelivered] = await puller.fetch(batch=10, wait=5)
        assert attempt_of(redelivered, datum_task(redelivered.data)) == 2
        await redelivered.ack()
        # ... and the set it came in is done with.
        await _until_held(broker, "again", (0, 0), what="the set message and the datum alone acked")


@pytest.mark.asyncio
async def test_a_stopping_worker_queues_at_once_the_datums_waiting_to_go_again(
    broker: Broker,
) -> None:
    async with _in_hand(broker, "stopping", 2) as (_, parts, (waiting, done)):
        await done.ack()
        await waiting.nak(delay=3600)
        await parts.close()  # well before the hour is over
        queued = [t for t in await _queued(broker, "stopping") if not t.more]
        assert [(t.datum, t.tries) for t in queued] == [("d0", 1)]
        await broker.nc.flush()
        # The set acked; d0 waits alone.
        await _until_held(broker, "stopping", (1, 0), what="the set message acked")


@pytest.mark.asyncio
async def test_a_set_inside_a_set_is_refused_saying_why(broker: Broker) -> None:
    inner = msgspec.structs.replace(_task("nested", 1), more=[_task("nested", 2)])
    outer = msgspec.structs.replace(_task("nested", 0), more=[inner])
    data = msgspec.json.encode(outer)
    with pytest.raises(Unusable, match="sets do not nest"):
        datum_task(data)
    fake = Msg(_client=broker.nc, subject=subjects.datum("nested"), data=data)
    # Left whole by the split, so that the worker refuses it (to the dead-letter subject).
    assert SetParts(broker, beat_every=1.0).split([fake]) == [fake]


@pytest.mark.asyncio
async def test_a_set_out_of_deliveries_gives_up_each_of_its_datums(broker: Broker) -> None:
    await _publish_set(broker, "given-up", 3)
    info = await broker.js.stream_info(subjects.DATUMS_STREAM)
    advisory = {
        "stream": subjects.DATUMS_STREAM,
        "consumer": subjects.worker_consumer("given-up"),
        "stream_seq": info.state.last_seq,
        "deliveries": 2,
    }
    msg = Msg(_client=broker.nc, subject="advisory", data=json.dumps(advisory).encode())
    await give_up_datum(broker=broker, msg=msg)
    found = results.first_results(await results.replay(broker, "given-up", "job1"))
    assert sorted(found) == ["d0", "d1", "d2"]
    assert {(r.state, r.attempts) for r in found.values()} == {("failed", 2)}
    assert await _queued(broker, "given-up") == []  # and the set is gone from the queue


# ----------------------------------------------------------------------------------- whole jobs


@pytest.mark.asyncio
async def test_a_job_in_sets_runs_each_datum_once_and_retries_one_alone(
    make_cluster, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(PYTHONPATH=str(REPO_ROOT))
    files = {f"/f{n}": f"{n}\n".encode() for n in range(40)}
    await put_files(cluster, "in", files)
    spec = json.loads(_spec("sets"))
    spec["datum_tries"] = 2
    create_pipeline(cluster, tmp_path, spec)
    [job] = await wait_job_done(cluster, "sets", timeout=90)
    assert job.state == "success", job.reason
    assert (job.data_total, job.data_processed, job.data_failed) == (40, 40, 0)
    found = await results_of(cluster, "sets")
    assert len(found) == 40 and len({r.datum for r in found}) == 40
    attempts = {r.files[0].path: r.attempts for r in found}
    assert attempts.pop("/f3") == 2
    assert set(attempts.values()) == {1}
    # Fewer messages than datums went through the queue: the datums travelled in sets.
    async with cluster.api() as api:
        stream = await api.broker.js.stream_info(subjects.DATUMS_STREAM)
    assert stream.state.last_seq < 40


WATCH = """
import asyncio, sys, time
import nats

async def main():
    nc = await nats.connect(sys.argv[1])
    sub = await nc.subscribe(sys.argv[2])
    await nc.flush()
    print("ready", flush=True)
    await sub.next_msg(timeout=30)
    print(time.monotonic(), flush=True)
    await nc.close()

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_a_jobs_first_sets_reach_the_broker_while_it_is_still_being_planned(
    broker: Broker, nats_server
) -> None:  # type: ignore[no-untyped-def]
    # A process of its own, as a worker is, notes when the first set arrives (the monotonic
    # clock is the machine's); the loop here does nothing but plan, as the planner's does while
    # it goes through a manifest.
    watcher = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WATCH,
        nats_server.url,
        subjects.datum("early"),
        stdout=asyncio.subprocess.PIPE,
    )
    assert watcher.stdout is not None
    assert await asyncio.wait_for(watcher.stdout.readline(), 30) == b"ready\n"
    publisher = Outbox(broker)
    packer = Packer(publisher, pipeline="early", size=16, workers=2)
    tasks = [_task("early", n) for n in range(20_000)]
    for task in tasks:
        await packer.add(task, msgspec.json.encode(task))
    planned = time.monotonic()
    await packer.finish()
    await publisher.flush()
    arrived = float(await asyncio.wait_for(watcher.stdout.readline(), 30))
    await watcher.wait()
    assert arrived < planned, "no set left before the whole job was planned"
