"""The consume loop every function shares: fetch, handle, then ack, nak or dead-letter.

What happens to a message follows the error its handler raised (datumflow.errors): nothing → ack;
PermanentError or a message that does not decode → term, and the message with the reason goes to
`df.dead.<function>`; anything else → nak with a delay, so it comes back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from datumflow.broker import subjects
from datumflow.broker.connection import TRANSIENT, Broker, broker_errors
from datumflow.broker.messages import VERSION, DeadLetter
from datumflow.errors import BrokerError, PermanentError, TemporaryError

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20
"""Messages larger than this are refused before decoding (the stream allows up to 8 MiB)."""


class Unusable(PermanentError):
    """A message that does not decode, has an unknown version, or is too large."""


W = TypeVar("W", bound=msgspec.Struct)


def decode(data: bytes, kind: type[W], *, what: str) -> W:
    """Decode a wire message, refusing oversized, malformed and unknown-version ones clearly."""
    if len(data) > MAX_MESSAGE:
        raise Unusable(f"{what}: {len(data)} bytes is over the {MAX_MESSAGE} byte limit")
    try:
        message = msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        version = _version_of(data)
        if version is not None and version != VERSION:
            raise Unusable(
                f"{what}: schema version v={version} is not one this datumflow reads (v={VERSION})"
            ) from None
        raise Unusable(f"{what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise Unusable(f"{what}: not valid JSON ({exc})") from None
    version = getattr(message, "v", VERSION)
    if version != VERSION:
        raise Unusable(f"{what}: schema version v={version} is not one this datumflow reads")
    return message


def _version_of(data: bytes) -> object:
    try:
        doc = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None
    return doc.get("v") if isinstance(doc, dict) else None


async def dead_letter(broker: Broker, *, function: str, msg: Msg, reason: str) -> None:
    """Keep an unusable message with its reason, where an operator will look for it."""
    log.error("%s: dropping a message from %s: %s", function, msg.subject, reason)
    letter = DeadLetter(
        function=function,
        subject=msg.subject,
        reason=reason,
        data=msg.data[:MAX_MESSAGE].decode("utf-8", errors="replace"),
        headers={k: str(v) for k, v in (msg.headers or {}).items()},
    )
    msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
    seq = msg.metadata.sequence.stream if msg.reply else 0
    await broker.publish(subjects.dead(function), letter, msg_id=f"dead:{function}:{msg_id or seq}")


class Subscription:
    """A bound durable pull consumer that rebinds itself after a broker restart.

    nats-py pull subscriptions can stop receiving after the server restarts (nats.py #504); a
    fresh bind after errors, or after a long silence, is the cure we rely on.
    """

    def __init__(self, broker: Broker, *, stream: str, durable: str) -> None:
        self.broker = broker
        self.stream = stream
        self.durable = durable
        self._sub: JetStreamContext.PullSubscription | None = None
        self._idle = 0

    async def _bind(self) -> JetStreamContext.PullSubscription:
        if self._sub is None:
            async with broker_errors(f"binding to consumer {self.durable}"):
                self._sub = await self.broker.js.pull_subscribe_bind(
                    durable=self.durable, stream=self.stream
                )
        return self._sub

    async def _rebind(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    async def fetch(self, *, batch: int = 1, wait: float = 1.0) -> list[Msg]:
        """Up to `batch` messages; [] when none came within `wait` seconds."""
        try:
            sub = await self._bind()
            msgs = await sub.fetch(batch=batch, timeout=wait)
        except (TimeoutError, nats.errors.TimeoutError):
            self._idle += 1
            if self._idle >= 30:  # half a minute of silence: make sure we are still attached
                self._idle = 0
                await self._rebind()
            return []
        except (*TRANSIENT, BrokerError, nats.js.errors.NotFoundError) as exc:
            log.warning("fetching from %s: %s; rebinding", self.durable, exc)
            await self._rebind()
            await asyncio.sleep(0.5)
            return []
        self._idle = 0
        return msgs

    async def close(self) -> None:
        await self._rebind()


Handler = Callable[[Msg], Awaitable[None]]


async def settle(broker: Broker, *, function: str, msg: Msg, handle: Handler) -> None:
    """Run the handler on one message and ack, nak or dead-letter it by the outcome."""
    try:
        await handle(msg)
    except PermanentError as exc:
        try:
            await dead_letter(broker, function=function, msg=msg, reason=str(exc))
            await msg.term()
        except (*TRANSIENT, BrokerError):
            pass  # not terminated: it comes back and we try again
        return
    except TemporaryError as exc:
        log.warning("%s: %s; retrying in %.1fs", function, exc, exc.delay)
        await _nak(msg, exc.delay)
        return
    except asyncio.CancelledError:
        await _nak(msg, 0)
        raise
    except Exception:
        log.exception("%s: unexpected error handling a message from %s", function, msg.subject)
        await _nak(msg, 2.0)
        return
    try:
        await msg.ack()
    except TRANSIENT:
        pass  # redelivered later; handlers are idempotent


async def _nak(msg: Msg, delay: float) -> None:
    try:
        await msg.nak(delay=delay or None)
    except Exception:
        pass


async def consume(
    broker: Broker,
    *,
    stream: str,
    durable: str,
    function: str,
    handle: Handler,
    stop: asyncio.Event,
    batch: int = 1,
) -> None:
    """Handle the consumer's messages one at a time until `stop` is set."""
    sub = Subscription(broker, stream=stream, durable=durable)
    try:
        while not stop.is_set():
            for msg in await sub.fetch(batch=batch, wait=1.0):
                await settle(broker, function=function, msg=msg, handle=handle)
    finally:
        await sub.close()
