"""The ceiling for no-op datums: bare nats-py consumers fetching and acking datum-sized messages
from a work-queue stream on the same broker, with the same number of processes, nothing else."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from typing import Any

import msgspec
import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from bench.scenarios import Measure
from datumflow.broker.messages import DatumInput, DatumTask, FileRef

STREAM = "BENCH_CEILING"
SUBJECT = "bench.ceiling"
CONSUMER = "bench-ceiling"
BATCH = 256


def _payload() -> bytes:
    """A datum task as the planner writes it for the no-op scenario: the same size on the wire."""
    ref = FileRef(path="/f0000001", size=6, hash="a" * 64)
    task = DatumTask(
        pipeline="noop",
        version=1,
        job="b" * 32,
        datum="c" * 64,
        hash="d" * 64,
        inputs=[
            DatumInput(
                name="noop-in",
                repo="noop-in",
                branch="master",
                commit="e" * 32,
                files=[ref],
                root=ref.path,
            )
        ],
    )
    return msgspec.json.encode(task)


def _consume(url: str, go: Any, results: Any) -> None:
    async def main() -> None:
        nc = await nats.connect(url)
        sub = await nc.jetstream().pull_subscribe_bind(durable=CONSUMER, stream=STREAM)
        go.wait()
        count, last = 0, time.time()
        while True:
            try:
                msgs = await sub.fetch(batch=BATCH, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            for msg in msgs:
                await msg.ack()
            count += len(msgs)
            last = time.time()
        await nc.flush()  # the last acks are with the server
        results.put((count, last))
        await nc.close()

    asyncio.run(main())


async def _fill(url: str, count: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await js.delete_stream(STREAM)
    except Exception:
        pass
    await js.add_stream(
        StreamConfig(
            name=STREAM,
            subjects=[SUBJECT],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
        )
    )
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name=CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            max_ack_pending=10_000,
        ),
    )
    payload = _payload()
    pending = []
    for i in range(count):
        headers = {"Nats-Msg-Id": f"ceiling:{i}"}
        pending.append(await js.publish_async(SUBJECT, payload, headers=headers))
        if len(pending) >= 256:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    await nc.close()


async def _drop(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(STREAM)
    finally:
        await nc.close()


def run(url: str, *, datums: int, workers: int) -> Measure:
    asyncio.run(_fill(url, datums))
    context = multiprocessing.get_context("spawn")
    go, results = context.Event(), context.Queue()
    procs = [context.Process(target=_consume, args=(url, go, results)) for _ in range(workers)]
    for p in procs:
        p.start()
    time.sleep(2.0)  # every consumer connected and bound before the clock starts
    started = time.time()
    go.set()
    counts = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    asyncio.run(_drop(url))
    total = sum(c for c, _ in counts)
    return Measure(
        system="nats-bare",
        scenario="noop",
        datums=total,
        seconds=max(t for _, t in counts) - started,
        ok=total == datums,
    )
