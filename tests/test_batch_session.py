"""The worker's side of `next datum` against the real client, over a real Unix socket: one call
at a time, a second one refused by name rather than taken as the report of a datum."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from datumflow.batching import SOCKET_VAR, BatchingError, next_datum
from datumflow.functions.worker.batch_session import CONCURRENT, Session
from datumflow.spec import Transform

pytestmark = pytest.mark.asyncio


async def test_a_second_call_while_one_waits_is_refused_and_the_first_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = Session(transform=Transform(cmd=["true"]), layout=tmp_path, sockets=tmp_path)
    server = await asyncio.start_unix_server(session.call, path=str(session.socket))
    monkeypatch.setenv(SOCKET_VAR, str(session.socket))
    try:
        first = asyncio.create_task(asyncio.to_thread(next_datum))
        event = await session.next_event(10)
        assert isinstance(event, tuple) and event[0] == ""
        session.waiting = event[1]

        with pytest.raises(BatchingError) as refused:
            await asyncio.to_thread(next_datum, error="this is not my datum")
        assert str(refused.value) == CONCURRENT
        assert session.events.empty(), "the refused call must not reach the worker"

        await session.answer({"PACH_DATUM_ID": "d1"})
        assert await asyncio.wait_for(first, 10) == {"PACH_DATUM_ID": "d1"}

        # Once answered, the code's next call is taken again.
        again = asyncio.create_task(asyncio.to_thread(next_datum))
        event = await session.next_event(10)
        assert isinstance(event, tuple) and event[0] == ""
        session.waiting = event[1]
        await session.answer(None)
        assert await asyncio.wait_for(again, 10) is None
    finally:
        server.close()
        await server.wait_closed()
