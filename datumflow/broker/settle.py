"""Settling messages: the one delivery rule every function follows, for one message or a batch.

Owns what becomes of a message once its handling has an outcome (datumflow.errors):

- none (it was handled): ack;
- `PermanentError`: the message and the reason go to the dead-letter subject `df.dead.<function>`,
  then the message is terminated: trying again cannot help;
- `TemporaryError`: nak with the delay it asks for, so the message comes back then;
- cancelled: nak at once, so that another consumer takes it now;
- anything else: nak after `UNEXPECTED_DELAY`, because a bug we have not seen should not drop data.

A broker error while settling is logged and goes no further: a message left unsettled is
redelivered after the consumer's ack_wait, and every handler is idempotent. A message whose dead
letter could not be published is not terminated (it would be lost): it is nak'ed to come back.

It also owns the message type the functions hold (`Msg`) and the heartbeat that keeps held messages
from being redelivered (`keep_alive`), so that nothing outside datumflow.broker touches nats-py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import nats.errors
from nats.aio.msg import Msg

from datumflow.broker import subjects
from datumflow.broker.connection import TRANSIENT, Broker
from datumflow.broker.messages import MAX_MESSAGE, DeadLetter
from datumflow.errors import DatumflowError, PermanentError, TemporaryError
from datumflow.metrics import current as current_metrics

__all__ = [
    "UNEXPECTED_DELAY",
    "Msg",
    "ack",
    "dead_letter",
    "keep_alive",
    "nak",
    "settle",
]

log = logging.getLogger(__name__)

UNEXPECTED_DELAY = 2.0
"""Seconds before a message whose handler failed unexpectedly, or whose dead letter could not be
published, comes back."""

# What settling a message can raise: the broker's own failures (a closed or reconnecting
# connection, a full buffer), nats-py refusing a message that was settled already, and the
# broker's failures and refusals of a dead letter, wrapped by `Broker.publish`.
_SETTLING = (*TRANSIENT, nats.errors.Error, DatumflowError)


def delivered(msg: Msg) -> int:
    """How many times the stream has delivered `msg` (1 the first time). nats-py's
    `msg.metadata` parses all of the reply subject into dataclasses, a timestamp among them; a
    worker needs this one number for every datum."""
    if msg._metadata is not None:  # parsed already (the datums of a set share their message's)
        return msg._metadata.num_delivered
    count = _reply_number(msg, v1=4, v2=Msg.Ack.NumDelivered)
    return msg.metadata.num_delivered if count is None else count  # None: nats-py says why


def waiting_after(msg: Msg) -> int | None:
    """How many messages the consumer had left to deliver once it delivered `msg` (the reply
    subject says it); None for a message that is not a JetStream delivery."""
    return _reply_number(msg, v1=8, v2=Msg.Ack.NumPending)


def _reply_number(msg: Msg, *, v1: int, v2: int) -> int | None:
    """The number at token `v1` (a reply subject of the old form) or `v2` (the new) of a
    JetStream delivery's reply subject."""
    tokens = (msg.reply or "").split(".")
    if tokens[:2] == ["$JS", "ACK"]:
        if len(tokens) == _V1_TOKENS:
            return int(tokens[v1])
        if len(tokens) >= _V2_TOKENS:
            return int(tokens[v2])
    return None


_V1_TOKENS = 9
"""$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>"""
_V2_TOKENS = 11
"""$JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<delivered>..., and maybe a token."""


def _many(msgs: Msg | Sequence[Msg]) -> Sequence[Msg]:
    return [msgs] if isinstance(msgs, Msg) else msgs


async def ack(msgs: Msg | Sequence[Msg]) -> None:
    """Ack each message; one that cannot be acked is redelivered later."""
    for msg in _many(msgs):
        try:
            await msg.ack()
        except _SETTLING as exc:
            log.debug("acking a message from %s failed (%s); it will come back", msg.subject, exc)


async def nak(msgs: Msg | Sequence[Msg], *, delay: float = 0.0) -> None:
    """Hand each message back, to be redelivered after `delay` seconds (0: at once)."""
    for msg in _many(msgs):
        try:
            await msg.nak(delay=delay or None)
        except _SETTLING as exc:
            log.debug(
                "nak of a message from %s failed (%s); it comes back anyway", msg.subject, exc
            )


async def keep_alive(msgs: Msg | Sequence[Msg]) -> None:
    """Tell the server we are still working on these messages (it restarts their ack_wait)."""
    for msg in _many(msgs):
        try:
            await msg.in_progress()
        except _SETTLING as exc:
            log.debug("heartbeat of a message from %s failed: %s", msg.subject, exc)


async def dead_letter(broker: Broker, *, function: str, msg: Msg, reason: str) -> None:
    """Keep an unusable message with its reason, where an operator will look for it. Raises
    BrokerError if the letter could not be stored for now, BrokerRefused if it cannot be."""
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
    subject = subjects.dead(function)
    await broker.publish(subject, letter, msg_id=f"dead:{function}:{msg_id or seq}")
    metrics = current_metrics()
    if metrics is not None:
        metrics.dead_letters.labels(subject=subject).inc()


async def settle(
    broker: Broker,
    *,
    function: str,
    msgs: Msg | Sequence[Msg],
    outcome: BaseException | None = None,
    max_delay: float | None = None,
) -> None:
    """Ack, nak or dead-letter and terminate `msgs` by the `outcome` of their handling (None: they
    were handled). `max_delay` caps the delay a TemporaryError asks for. Never raises."""
    batch = _many(msgs)
    if not batch:
        return
    if outcome is None:
        await ack(batch)
    elif isinstance(outcome, PermanentError):
        for msg in batch:
            try:
                await dead_letter(broker, function=function, msg=msg, reason=str(outcome))
                await msg.term()
            except _SETTLING as exc:
                log.warning(
                    "%s: dead-lettering a message from %s failed (%s); it will come back",
                    function,
                    msg.subject,
                    exc,
                )
                await nak(msg, delay=UNEXPECTED_DELAY)
    elif isinstance(outcome, TemporaryError):
        delay = outcome.delay if max_delay is None else min(outcome.delay, max_delay)
        await nak(batch, delay=delay)
    elif isinstance(outcome, asyncio.CancelledError):
        await nak(batch, delay=0)
    else:
        log.error(
            "%s: unexpected error handling %d message(s) from %s; they will come back",
            function,
            len(batch),
            batch[0].subject,
            exc_info=outcome,
        )
        await nak(batch, delay=UNEXPECTED_DELAY)
