"""One run of a datum-batching pipeline's user code, seen from its worker: the process, the
socket its `next datum` calls arrive on, the call waiting for the next datum, and the output kept
for the datum in hand.

The wire, one connection a call: the caller sends the error it reports (empty: the datum in hand is
done) and shuts its side down; the answer is b"D" and the next datum's variables as NUL-separated
`name=value`, b"N" for no more datums, or b"E" and why the call is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path

import msgspec

from datumflow.functions.worker import sandbox
from datumflow.spec import Transform

MAX_ERROR = 64 << 10
"""Bytes of a `next datum --error` message kept."""
CONCURRENT = (
    "another next datum call of this code is waiting already: call next datum from one place at a"
    " time, once the datum in hand is done"
)
"""Why a second call made while one waits is refused."""

Call = tuple[str, asyncio.StreamWriter]
"""A `next datum` call waiting for its answer: the error it reported (empty: done) and where to
answer."""


class Exited(msgspec.Struct):
    outcome: sandbox.Outcome


class Session:
    """One run of the user code: its process, its socket, the datum it holds."""

    def __init__(self, *, transform: Transform, layout: Path, sockets: Path) -> None:
        self.transform = transform
        self.layout = layout
        self.sockets = sockets
        self.events: asyncio.Queue[Call | Exited] = asyncio.Queue()
        self.waiting: asyncio.StreamWriter | None = None
        """The call to answer with the next datum."""
        self.open_call: asyncio.StreamWriter | None = None
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
        if self.open_call is not None and not self.open_call.is_closing():
            # A second call while one waits would be taken as the report of a datum it never
            # had: that datum would pass with an empty output. Refuse it, saying why.
            with contextlib.suppress(OSError):
                writer.write(b"E" + CONCURRENT.encode())
                await writer.drain()
            writer.close()
            return
        self.open_call = writer
        self.events.put_nowait((error, writer))

    async def answer(self, env: dict[str, str] | None) -> None:
        """Answer the waiting call: the next datum's variables, or None for no more datums."""
        writer, self.waiting = self.waiting, None
        if writer is None:
            return
        if env is None:
            answer = b"N"
        else:
            answer = b"D" + "\0".join(f"{k}={v}" for k, v in env.items()).encode()
        with contextlib.suppress(OSError):
            writer.write(answer)
            await writer.drain()
        writer.close()

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
        while not self.events.empty():
            event = self.events.get_nowait()
            if not isinstance(event, Exited):
                event[1].close()
        await asyncio.to_thread(shutil.rmtree, self.sockets, True)
        return outcome
