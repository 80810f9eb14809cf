"""The worker's local store fsyncs in groups: a put returns once the object is in place, and the
reporter makes every object a group of results names durable before it publishes them.

The disk is real; only `os.fsync` is watched (or made to fail, as a dying disk would), since
whether data reached the platters cannot be seen from inside the machine."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from datumflow.broker import subjects
from datumflow.broker.messages import DatumResult
from datumflow.errors import NotFound
from datumflow.storage import FileStore
from tests.helpers import datums_in_hand


def _watch_fsyncs(monkeypatch: pytest.MonkeyPatch, *, fail: bool = False) -> list[str]:
    """The paths fsynced from now on (each `os.fsync` resolved through /proc/self/fd)."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if fail:
            raise OSError(errno.EIO, "Input/output error (injected)")
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


@pytest.mark.asyncio
async def test_puts_are_fsynced_at_once_unless_the_store_syncs_on_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = _watch_fsyncs(monkeypatch)
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(b"one line\n")
    big.write_bytes(os.urandom(300 << 10))  # past INLINE: written by a thread

    store = FileStore(tmp_path / "objects")
    await store.put_file(small)
    # Fsynced before it returned: the temporary file, before its rename into place.
    assert len(synced) == 1 and Path(synced[0]).parent == tmp_path / "objects" / "tmp"

    synced.clear()
    grouped = FileStore(tmp_path / "grouped", sync_on_flush=True)
    keys = [
        (await grouped.put_file(small))[0],
        (await grouped.put_file(big))[0],
        (await grouped.put_bytes(b"a manifest\n"))[0],
        (await grouped.put_bytes(b"a manifest\n"))[0],  # already there: flushed all the same
    ]
    assert synced == []
    for key in keys:  # in place and readable before the flush, each with the right content
        assert (tmp_path / "grouped" / key[:2] / key).exists()
    assert await grouped.get_bytes(keys[2]) == b"a manifest\n"  # read on the loop
    assert await grouped.get_bytes(keys[1]) == big.read_bytes()  # read by a thread
    for key, source in ((keys[0], small), (keys[1], big)):  # copied on the loop, and by a thread
        copy = tmp_path / f"copy-{key}"
        assert await grouped.get_file(key, copy) == source.stat().st_size
        assert copy.read_bytes() == source.read_bytes()
    with pytest.raises(NotFound, match="is not in the store"):
        await grouped.get_file("ab" * 32, tmp_path / "nothing")
    with pytest.raises(NotFound, match="is not in the store"):
        await grouped.get_bytes("ab" * 32)

    await grouped.flush()
    assert [Path(p).name for p in synced] == keys[:3]  # each object once, in the order put
    synced.clear()
    await grouped.flush()
    assert synced == []  # nothing put since


@pytest.mark.asyncio
async def test_results_whose_outputs_cannot_be_made_durable_are_not_published(
    broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from datumflow.functions.worker.batch import Heartbeat
    from datumflow.functions.worker.reporter import Reporter

    puller, msgs = await datums_in_hand(broker, "rep", 2)
    heartbeat = Heartbeat(every=10)
    heartbeat.hold(msgs)

    store = FileStore(tmp_path / "objects", sync_on_flush=True)
    output, _ = await store.put_bytes(b"the datum's output manifest\n")
    _watch_fsyncs(monkeypatch, fail=True)  # the disk fails the fsync
    reporter = Reporter(broker, heartbeat, store=store)
    for i, msg in enumerate(msgs):
        reporter.report(
            msg, DatumResult(pipeline="rep", job="j", datum=f"d{i}", state="success", output=output)
        )
    await reporter.close()
    await heartbeat.close()

    # Nothing names the object the disk may have lost, and both datums are to be done again.
    info = await broker.js.stream_info(subjects.RESULTS_STREAM)
    assert info.state.messages == 0
    again = await puller.fetch(batch=2, wait=5)
    assert sorted(m.data for m in again) == [b"{}", b"{}"] and len(again) == 2
    for msg in again:
        await msg.ack()
    await puller.close()
