"""The worker's pipes for `next datum` against the real `#!/bin/sh` client it writes: a datum's
variables and a reported failure both ways intact, a garbled request line refused by name with
nothing taken, and the cost of a call."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from datumflow.functions.worker.batch_fifo import GARBLED, LINE_LIMIT, REQUEST
from datumflow.functions.worker.batch_session import CONCURRENT, Session
from datumflow.spec import Transform

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def session(tmp_path: Path) -> AsyncIterator[Session]:
    sockets = tmp_path / "sockets"
    sockets.mkdir(mode=0o700)
    session = Session(transform=Transform(cmd=["true"]), layout=tmp_path, sockets=sockets)
    session.serve_pipes(None)
    yield session
    await session.end(grace=0)


def client(session: Session) -> str:
    return str(session.pipes.bin / "datumflow-next-datum")


async def call(session: Session, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        client(session), *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


async def taken(session: Session, want: str) -> None:
    event = await session.next_event(10)
    assert isinstance(event, tuple), event
    assert event[0] == want
    session.waiting = event[1]


async def test_a_datum_and_a_failure_cross_the_pipes_intact(session: Session) -> None:
    odd = "two\nlines, a \\ and a 'quote' and \\n kept as typed"
    first = await call(session, "--error", odd)
    await taken(session, odd)
    env = {"nums": "/pfs/nums/it's\nodd \\n", "PACH_DATUM_ID": "d1"}
    await session.answer(env)
    out, err = await asyncio.wait_for(first.communicate(), 10)
    assert (first.returncode, err) == (0, b"")
    # What the client prints, evaluated by a shell, gives back the variables as they were.
    shown = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        'eval "$1"; printf "%s|%s" "$nums" "$PACH_DATUM_ID"',
        "-",
        out.decode(),
        stdout=subprocess.PIPE,
    )
    printed, _ = await asyncio.wait_for(shown.communicate(), 10)
    assert printed.decode() == f"{env['nums']}|d1"

    done = await call(session)
    await taken(session, "")
    await session.answer(None)
    assert await asyncio.wait_for(done.wait(), 10) == 3  # no more datums


async def test_a_garbled_request_line_is_refused_and_takes_nothing(session: Session) -> None:
    first = await call(session)
    await taken(session, "")
    waiting = session.waiting
    req = session.sockets / REQUEST
    # No caller named: nothing to answer, it is said in the code's output.
    await asyncio.to_thread(req.write_text, "garbage with no pid\n")
    # A caller named, a request not understood: that caller is told why.
    garbled = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        f'mkfifo "$1/rep.$$" && exec 3<>"$1/rep.$$" && printf "%s nonsense\\n" $$ > {req}'
        ' && IFS= read -r l <&3 && echo "$l"',
        "-",
        str(session.sockets),
        stdout=subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(garbled.communicate(), 10)
    assert f"E {GARBLED}" in out.decode()
    assert "'garbage with no pid'" in session.log.decode()
    # Nothing was taken: the datum in hand is still the first call's, which gets the next one.
    assert session.events.empty() and session.waiting is waiting
    await session.answer({"PACH_DATUM_ID": "d2"})
    out, _ = await asyncio.wait_for(first.communicate(), 10)
    assert out == b"export PACH_DATUM_ID='d2'\n"


async def test_a_second_call_while_one_waits_is_refused(session: Session) -> None:
    first = await call(session)
    await taken(session, "")
    second = await call(session, "--error", "not mine")
    _, err = await asyncio.wait_for(second.communicate(), 10)
    assert second.returncode == 2
    assert CONCURRENT in err.decode()
    assert session.events.empty()
    await session.answer(None)
    assert await asyncio.wait_for(first.wait(), 10) == 3


async def test_an_overlong_request_is_refused_and_takes_nothing(session: Session) -> None:
    # Longer than the client can send (an argument holds 128 KiB): written by hand, as its
    # caller, holding its reply pipe open as the client does.
    pid = os.getpid()
    reply = session.sockets / f"rep.{pid}"
    os.mkfifo(reply)
    fd = os.open(reply, os.O_RDWR)
    try:
        line = f"{pid} error " + "x" * (LINE_LIMIT + 10) + "\n"
        await asyncio.to_thread((session.sockets / REQUEST).write_text, line)
        answer = await asyncio.wait_for(asyncio.to_thread(os.read, fd, 4096), 10)
    finally:
        os.close(fd)
    assert answer.decode() == f"{pid} E a request line longer than {LINE_LIMIT} bytes\n"
    assert session.events.empty()
    # The pipe is whole again: the next call is taken.
    done = await call(session)
    await taken(session, "")
    await session.answer(None)
    assert await asyncio.wait_for(done.wait(), 10) == 3


async def test_a_caller_that_does_not_read_its_reply_does_not_block_the_worker(
    session: Session,
) -> None:
    """A reply pipe its caller filled and does not read: the worker's write must not wait on it
    (it runs on the worker's event loop)."""
    pid = 4_000_000
    path = session.pipes.directory / f"rep.{pid}"
    os.mkfifo(path, 0o600)
    held = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # the caller's end, never read
    try:
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(held, b"x" * 4096)
        loop = asyncio.get_running_loop()
        replied = loop.run_in_executor(None, session.pipes.reply, pid, "N")
        try:
            await asyncio.wait_for(asyncio.shield(replied), 2.0)
        except TimeoutError:
            os.read(held, 1 << 20)  # let the stuck write end, then fail
            await replied
            pytest.fail("the reply waited on a caller that does not read")
    finally:
        os.close(held)


async def test_a_reply_is_never_written_through_a_link_or_into_a_file(
    session: Session, tmp_path: Path
) -> None:
    """rep.<pid> is in the code's directory: a worker running as root must not write its reply
    to a file the code links there, nor to a plain file of that name."""
    target = tmp_path / "precious"
    target.write_bytes(b"kept as it was\n")
    linked, plain = session.pipes.directory / "rep.1001", session.pipes.directory / "rep.1002"
    linked.symlink_to(target)
    plain.write_bytes(b"kept as it was\n")
    session.pipes.reply(1001, "E", "x" * 20)
    session.pipes.reply(1002, "N")
    assert target.read_bytes() == b"kept as it was\n"
    assert plain.read_bytes() == b"kept as it was\n"


async def test_usage_errors_exit_2(session: Session) -> None:
    wrong = await call(session, "--bogus")
    _, err = await asyncio.wait_for(wrong.communicate(), 10)
    assert wrong.returncode == 2
    assert b"usage: datumflow-next-datum [--error MESSAGE]" in err
    assert session.events.empty()


async def test_the_cost_of_a_call(session: Session) -> None:
    """200 calls from a shell loop, each answered at once: the cost of a call, printed (a figure
    for the README, not a timed assertion)."""
    calls = 200

    async def serve() -> None:
        for n in range(calls):
            event = await session.next_event(30)
            assert isinstance(event, tuple)
            session.waiting = event[1]
            await session.answer({"PACH_DATUM_ID": f"d{n}"})

    server = asyncio.create_task(serve())
    started = time.monotonic()
    loop = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        f'n=0; while [ $n -lt {calls} ]; do eval "$("{client(session)}")" || exit 9;'
        ' [ "$PACH_DATUM_ID" = "d$n" ] || exit 8; n=$((n+1)); done',
    )
    assert await asyncio.wait_for(loop.wait(), 120) == 0
    elapsed = time.monotonic() - started
    await asyncio.wait_for(server, 10)
    load = os.getloadavg()[0]
    print(f"\nnext datum from sh: {elapsed / calls * 1000:.2f} ms a call (load {load:.1f})")
