"""The consume loop of the control functions, and decoding what they consume.

Owns the bound durable pull consumer that rebinds itself after a broker restart (`Subscription`),
the loop that fetches one message at a time and settles it by its handler's outcome (`consume`,
following datumflow.broker.settle), and the decoding of wire messages that refuses oversized,
malformed and unknown-version ones (`decode`, raising `Unusable`, a PermanentError).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
import nats.errors
from nats.js import JetStreamContext

from datumflow.broker.connection import TRANSIENT, Broker, broker_errors
from datumflow.broker.messages import MAX_MESSAGE, VERSION
from datumflow.broker.nats_errors import wrapped
from datumflow.broker.settle import Msg, settle
from datumflow.errors import (
    BrokerRefused,
    DatumflowError,
    PermanentError,
    TemporaryError,
)

__all__ = ["MAX_MESSAGE", "Handler", "Subscription", "Unusable", "consume", "decode"]

log = logging.getLogger(__name__)


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
        except (*TRANSIENT, DatumflowError, nats.errors.Error) as exc:
            error = (
                exc
                if isinstance(exc, DatumflowError)
                else wrapped(exc, what=f"fetching from consumer {self.durable}")
            )
            # A consumer not found is one being made again (a pipeline updated): bind anew, as
            # after anything that may pass (BrokerNotFound is a BrokerError). A refusal would
            # come back the same every time.
            if isinstance(error, BrokerRefused):
                if error is exc:
                    raise
                raise error from exc
            log.warning("fetching from %s: %s; rebinding", self.durable, error)
            await self._rebind()
            await asyncio.sleep(0.5)
            return []
        self._idle = 0
        return msgs

    async def close(self) -> None:
        await self._rebind()


Handler = Callable[[Msg], Awaitable[None]]


async def _handle(broker: Broker, *, function: str, msg: Msg, handle: Handler) -> None:
    """Run the handler on one message and settle it by the outcome."""
    try:
        await handle(msg)
    except asyncio.CancelledError as exc:
        await settle(broker, function=function, msgs=msg, outcome=exc)
        raise
    except TemporaryError as exc:
        log.warning("%s: %s; retrying in %.1fs", function, exc, exc.delay)
        await settle(broker, function=function, msgs=msg, outcome=exc)
    except Exception as exc:
        await settle(broker, function=function, msgs=msg, outcome=exc)
    else:
        await settle(broker, function=function, msgs=msg)


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
                await _handle(broker, function=function, msg=msg, handle=handle)
    finally:
        await sub.close()
