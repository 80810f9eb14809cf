"""One run of a datum-batching pipeline's user code, seen from its worker: the process, the
socket and the pipes its `next datum` calls arrive on, the call waiting for the next datum, and
the output kept for the datum in hand.

The socket's wire, one connection a call: the caller sends the error it reports (empty: the datum
in hand is done) and shuts its side down; the answer is b"D" and the next datum's variables as
NUL-separated `name=value`, b"N" for no more datums, or b"E" and why the call is refused. The
pipes' (the shell client's): datumflow.functions.worker.batch_fifo.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path

import msgspec

from datumflow.functions.worker import sandbox
from datumflow.functions.worker.batch_fifo import Pipes, quote
from datumflow.functions.worker.proctree import alive
from datumflow.spec import Transform

MAX_ERROR = 64 << 10
"""Bytes of a `next datum --error` message kept."""
CONCURRENT = (
    "another next datum call of this code is waiting already: call next datum from one place at a"
    " time, once the datum in hand is done"
)
"""Why a second call made while one waits is refused."""


class SocketReply:
    """Where to answer a call made on the socket (the Python client)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def gone(self) -> bool:
        return self.writer.is_closing()

    async def send(self, *, env: dict[str, str] | None, refused: str = "") -> bool:
        if refused:
            data = b"E" + refused.encode()
        elif env is None:
            data = b"N"
        else:
            data = b"D" + "\0".join(f"{k}={v}" for k, v in env.items()).encode()
        try:
            self.writer.write(data)
            await self.writer.drain()
        except OSError:
            return False
        finally:
            self.writer.close()
        return True

    def close(self) -> None:
        self.writer.close()


class PipeReply:
    """Where to answer a call made on the pipes (the shell client): its caller's pid."""

    def __init__(self, pipes: Pipes, pid: int) -> None:
        self.pipes = pipes
        self.pid = pid
        self.answered = False

    def gone(self) -> bool:
        return self.answered or not alive(self.pid)

    async def send(self, *, env: dict[str, str] | None, refused: str = "") -> bool:
        self.answered = True
        if refused:
            return self.pipes.reply(self.pid, "E", refused)
        if env is None:
            return self.pipes.reply(self.pid, "N")
        lines = "".join(f"export {k}={quote(v)}\n" for k, v in sorted(env.items()))
        return self.pipes.reply(self.pid, "D", lines)

    def close(self) -> None:
        pass  # the caller waits for a reply line until the code is stopped


Reply = SocketReply | PipeReply
Call = tuple[str, Reply]
"""A `next datum` call waiting for its answer: the error it reported (empty: done) and where to
answer."""


class Exited(msgspec.Struct):
    outcome: sandbox.Outcome


class Session:
    """One run of the user code: its process, its socket, the datum it holds."""

    def __init__(self, *, transform: Transform, layout: Path, sockets: Path) -> None:
        self.transform = transform
        self.pipes = Pipes(sockets)
        self.reading: asyncio.Task[None] | None = None
        self.layout = layout
        self.sockets = sockets
        self.events: asyncio.Queue[Call | Exited] = asyncio.Queue()
        self.waiting: Reply | None = None
        """The call to answer with the next datum."""
        self.open_call: Reply | None = None
        """The one call taken and not answered yet: a second one at the same time is refused."""
        self.kill = asyncio.Event()
        self.process: asyncio.Task[sandbox.Outcome] | None = None
        self.server: asyncio.Server | None = None
        self.live = ""
        """The log subject of the datum in hand; empty between datums."""
        self.log = bytearray()
        self.dropped = 0
        self.started = time.monotonic()

    @property
    def socket(self) -> Path:
        return self.sockets / "next"

    def take_log(self) -> bytes:
        out = bytes(self.log)
        if self.dropped:
            out += f"\n[datumflow: {self.dropped} more bytes of output dropped]\n".encode()
        self.log, self.dropped = bytearray(), 0
        return out

    def keep(self, chunk: bytes) -> None:
        room = max(sandbox.LOG_CAP - len(self.log), 0)
        self.log.extend(chunk[:room])
        self.dropped += max(len(chunk) - room, 0)

    async def call(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = bytearray()
        try:
            # The request ends where the caller shuts its side down.
            while chunk := await reader.read(65536):
                data.extend(chunk[: max(MAX_ERROR - len(data), 0)])
            error = data.decode(errors="replace")
        except OSError:
            writer.close()
            return
        await self._take(error, SocketReply(writer))

    def serve_pipes(self, run_as: tuple[int, int] | None) -> None:
        """Create the pipes and the shell client, and take the calls made on them."""
        self.pipes.create(run_as)
        self.reading = asyncio.create_task(self.pipes.serve(self._pipe_call))

    async def _pipe_call(self, pid: int, error: str | None, garbled: str) -> None:
        if error is None:
            # Nothing is taken: the datum in hand and the waiting call stay as they were.
            self.keep(f"[datumflow: next datum: {garbled}]\n".encode())
            if pid:
                self.pipes.reply(pid, "E", garbled)
            return
        await self._take(error[:MAX_ERROR], PipeReply(self.pipes, pid))

    async def _take(self, error: str, reply: Reply) -> None:
        if self.open_call is not None and not self.open_call.gone():
            # A second call while one waits would be taken as the report of a datum it never
            # had: that datum would pass with an empty output. Refuse it, saying why.
            await reply.send(env=None, refused=CONCURRENT)
            return
        self.open_call = reply
        self.events.put_nowait((error, reply))

    async def answer(self, env: dict[str, str] | None) -> bool:
        """Answer the waiting call: the next datum's variables, or None for no more datums;
        False if no caller got the answer (none waited, or it was gone)."""
        reply, self.waiting = self.waiting, None
        return reply is not None and await reply.send(env=env)

    async def next_event(self, timeout: float | None) -> Call | Exited | None:
        """The code's next call, or its exit; None at `timeout`."""
        try:
            return await asyncio.wait_for(self.events.get(), timeout=timeout)
        except TimeoutError:
            return None

    async def end(self, *, grace: float) -> sandbox.Outcome | None:
        """Tell a waiting call there are no more datums, let the code exit within `grace`, kill
        its process tree past that; remove the socket."""
        await self.answer(None)
        outcome = None
        if self.process is not None:
            done, _ = await asyncio.wait({self.process}, timeout=grace)
            if not done:
                self.kill.set()
            with contextlib.suppress(Exception):
                outcome = await self.process
        if self.server is not None:
            self.server.close()
        if self.reading is not None:
            self.reading.cancel()
            with contextlib.suppress(BaseException):
                await self.reading
        self.pipes.close()
        while not self.events.empty():
            event = self.events.get_nowait()
            if not isinstance(event, Exited):
                event[1].close()
        await asyncio.to_thread(shutil.rmtree, self.sockets, True)
        return outcome
