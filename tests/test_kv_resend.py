"""KV writes whose answer was lost (datumflow.broker.kv): sent again, and recognised as ours when
the first try had landed; someone else's write in between still counts as theirs."""

from __future__ import annotations

import nats.errors
import pytest

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.kv import Records
from datumflow.broker.records import JobHead
from datumflow.errors import Conflict

pytestmark = pytest.mark.asyncio


async def test_a_kv_write_whose_answer_was_lost_is_sent_again_and_recognised(
    broker: Broker,
) -> None:
    """A create and a compare-and-set that reached the stream but timed out on the way back:
    resent, refused as "wrong last sequence", and found to be ours."""
    records = Records(broker, bucket=subjects.JOB_HEADS_BUCKET, type=JobHead)
    kv = await broker.kv(subjects.JOB_HEADS_BUCKET)
    real_create, real_update = kv.create, kv.update
    lost = {"create": 1, "update": 1}

    async def create(key: str, value: bytes, **kw: object) -> int:
        revision = await real_create(key, value)
        if lost["create"]:
            lost["create"] -= 1
            raise nats.errors.TimeoutError
        return revision

    async def update(key: str, value: bytes, last: int | None = None, **kw: object) -> int:
        revision = await real_update(key, value, last=last)
        if lost["update"]:
            lost["update"] -= 1
            raise nats.errors.TimeoutError
        return revision

    kv.create, kv.update = create, update  # type: ignore[method-assign]
    try:
        assert await records.create("p", JobHead(pipeline="p"))
        _, revision = await records.get("p")
        new = await records.swap("p", JobHead(pipeline="p", last_job="j"), revision=revision)
        assert new > revision
        assert (await records.get("p"))[0].last_job == "j"
        # Someone else's write in between is still a conflict, and an existing key still exists.
        assert not await records.create("p", JobHead(pipeline="p"))
    finally:
        kv.create, kv.update = real_create, real_update  # type: ignore[method-assign]


async def test_a_lost_answer_then_someone_elses_write_is_a_conflict(broker: Broker) -> None:
    records = Records(broker, bucket=subjects.JOB_HEADS_BUCKET, type=JobHead)
    assert await records.create("q", JobHead(pipeline="q"))
    _, revision = await records.get("q")
    kv = await broker.kv(subjects.JOB_HEADS_BUCKET)
    real_update = kv.update
    calls = 0

    async def update(key: str, value: bytes, last: int | None = None, **kw: object) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            # Not applied, no answer; meanwhile another writer moves the key.
            await real_update(key, b'{"pipeline":"q","last_job":"theirs"}', last=last)
            raise nats.errors.TimeoutError
        return await real_update(key, value, last=last)

    kv.update = update  # type: ignore[method-assign]
    try:
        with pytest.raises(Conflict):
            await records.swap("q", JobHead(pipeline="q", last_job="ours"), revision=revision)
        assert calls == 2
        assert (await records.get("q"))[0].last_job == "theirs"
    finally:
        kv.update = real_update  # type: ignore[method-assign]
