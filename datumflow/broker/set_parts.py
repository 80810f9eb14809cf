"""The datums of one set message, each settled on its own.

The planner puts the datums of an in-process function's job into messages of several datums each
(`DatumTask.more`, functions.datum_sets): for tiny datums a message each costs the planner, the
broker and the worker more than the datums do. A worker splits such a message into `Part`s, one a
datum, and holds and settles each part exactly as it does a message of one datum:

- ack, term: that datum is settled (its result stored, or its dead letter); the message is acked
  once every part of it is;
- nak(delay): that datum is published again alone, `delay` seconds later, carrying the attempts
  made so far (`DatumTask.tries`: the nak counts as one, as the redelivery it stands for would);
  the message is held, and kept alive, until then;
- in_progress: the message's, once a round of the worker's heartbeat however many parts ask.

A part is a delivery of its message: its reply subject, and so its delivery count and sequence,
are the message's. A worker that dies holding parts leaves the whole message to be redelivered:
the datums it had reported are done again, and the committer keeps the first result of each. A
datum that cannot be published again makes its message nak'ed, not acked, once every part is
settled: for the same reason, that loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec
from nats.errors import MsgAlreadyAckdError

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.consumer import decode
from datumflow.broker.messages import DatumTask
from datumflow.broker.settle import Msg, delivered
from datumflow.errors import PermanentError

log = logging.getLogger(__name__)

PATIENCE = 5.0
"""Seconds a datum's publication waits for the broker (more, and the message comes back)."""
_MARK = b'"more":'
"""In a datum message's JSON only as the key of `more` (a quote inside a string is escaped):
a message without it is a single datum, left as it is, not decoded twice."""


def datums_of(task: DatumTask) -> list[DatumTask]:
    """Each datum a datum message carries: itself (without `more`), then those of `more`."""
    return [msgspec.structs.replace(task, more=[]), *task.more] if task.more else [task]


class SetMessage:
    """A set message in hand: the parts not settled yet, and whether it may be acked."""

    def __init__(self, msg: Msg, *, owner: SetParts, count: int) -> None:
        self.msg = msg
        self.metadata = msg.metadata
        """Parsed once for all its datums (its delivery count is theirs)."""
        self.owner = owner
        self.left = count
        self.failed = False
        self._beaten = float("-inf")

    async def settled(self) -> None:
        self.left -= 1
        if self.left == 0:
            # Raises what an ack or a nak of a message raises: the callers' settling handles it.
            await (self.msg.nak() if self.failed else self.msg.ack())

    async def beat(self) -> None:
        now = asyncio.get_running_loop().time()
        # The parts of a set are beaten one after another in one round: the first one does.
        if now - self._beaten >= self.owner.beat_every / 2:
            self._beaten = now
            await self.msg.in_progress()


class Part(Msg):
    """One datum of a set message: a message of one datum to the worker that holds it."""

    def __init__(self, whole: SetMessage, task: DatumTask) -> None:
        # Not Msg's own __init__: `data` is made from the task only when something reads it
        # (a dead letter, a hand-back), not for each datum.
        msg = whole.msg
        self._client = msg._client
        self.subject = msg.subject
        self.reply = msg.reply
        self.headers = {"Nats-Msg-Id": f"{task.job}:{task.datum}"}
        self._metadata = whole.metadata
        self._ackd = False
        self._sid = msg._sid
        self.whole = whole
        self.task = task

    @property
    def data(self) -> bytes:
        return msgspec.json.encode(self.task)

    @data.setter
    def data(self, value: Any) -> None:  # Msg's fields are assigned only by its own __init__
        raise AttributeError("a datum of a set message is read-only")

    async def ack(self) -> None:
        self._settle()
        await self.whole.settled()

    async def term(self) -> None:
        self._settle()
        await self.whole.settled()

    async def nak(self, delay: int | float | None = None) -> None:
        self._settle()
        await self.whole.owner.again(self, delay=float(delay or 0))

    async def in_progress(self) -> None:
        await self.whole.beat()

    def _settle(self) -> None:
        if self._ackd:
            raise MsgAlreadyAckdError(self)  # as nats-py refuses a message settled twice
        self._ackd = True


class SetParts:
    """A worker's splitter of set messages, and the datums it holds to publish again later."""

    def __init__(self, broker: Broker, *, beat_every: float) -> None:
        self.broker = broker
        self.beat_every = beat_every
        """Seconds between two rounds of the worker's heartbeat (batch.Heartbeat)."""
        self.per_message = 1.0
        """Datums a message held in the last fetch: to turn datums wanted into messages."""
        self._later: dict[int, tuple[Part, asyncio.Task[None]]] = {}
        self._sleeping: set[int] = set()
        """Parts of `_later` still waiting out their delay."""

    def split(self, msgs: list[Msg]) -> list[Msg]:
        """Each set message as its parts, in order; any other message as it is (one that cannot
        be decoded too: the worker refuses it, saying why)."""
        out: list[Msg] = []
        for msg in msgs:
            if _MARK not in msg.data:
                out.append(msg)
                continue
            try:
                first = decode(msg.data, DatumTask, what="datum task")
            except PermanentError:
                out.append(msg)
                continue
            tasks = datums_of(first)
            if any(task.more for task in tasks):
                out.append(msg)  # a set inside a set: refused whole
                continue
            whole = SetMessage(msg, owner=self, count=len(tasks))
            out.extend(Part(whole, task) for task in tasks)
        if msgs:
            self.per_message = len(out) / len(msgs)
        return out

    async def again(self, part: Part, *, delay: float) -> None:
        """Publish `part`'s datum again alone, now or after `delay` seconds."""
        if delay <= 0:
            await self._publish(part)
            return
        task = asyncio.create_task(self._after(part, delay))
        self._later[id(part)] = (part, task)
        self._sleeping.add(id(part))
        task.add_done_callback(lambda _: self._later.pop(id(part), None))

    async def _after(self, part: Part, delay: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + delay
        while (left := end - loop.time()) > 0:
            await asyncio.sleep(min(left, self.beat_every))
            if end - loop.time() > 0:
                with contextlib.suppress(Exception):
                    await part.whole.beat()
        self._sleeping.discard(id(part))  # from here on, `close` waits for it
        try:
            await self._publish(part)
        except Exception as exc:  # a task's own: nothing else would hear of it
            log.debug("settling a set message failed (%s); it will come back", exc)

    async def _publish(self, part: Part) -> None:
        task, whole = part.task, part.whole
        tries = task.tries + delivered(part)
        again = msgspec.structs.replace(task, tries=tries)
        seq = part.metadata.sequence.stream
        try:
            await self.broker.publish(
                subjects.datum(task.pipeline),
                again,
                msg_id=f"{task.job}:{task.datum}:again:{seq}:{tries}",
                patience=PATIENCE,
            )
        except Exception as exc:
            log.warning(
                "datum %s could not be published again (%s); its set comes back whole",
                task.datum[:12],
                exc,
            )
            whole.failed = True
        await whole.settled()

    async def close(self) -> None:
        """Stopping: publish now the datums waiting to go again."""
        waiting = list(self._later.values())
        self._later.clear()
        for part, task in waiting:
            if id(part) not in self._sleeping:
                await asyncio.wait({task})  # publishing already
                continue
            self._sleeping.discard(id(part))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await self._publish(part)
