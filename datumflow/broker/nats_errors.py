"""The NATS error table: what nats-py raises, turned into datumflow errors that say what to do.

Owns which of the broker's failures are worth another try and which are not, and `broker_errors`,
the boundary every call into nats-py in datumflow.broker runs inside, so that nothing outside the
package sees a nats-py exception:

| the broker...                                           | becomes        | so a message is     |
|---------------------------------------------------------|----------------|---------------------|
| did not answer: timeout, no responders, connection lost,| BrokerError    | nak'ed, 1 s         |
| 503 "temporarily unavailable", 500 (no leader, ...)     |                |                     |
| is out of room: storage, memory, a limit of streams,    | BrokerFull     | nak'ed, FULL_DELAY  |
| consumers or bytes (err_code 10023, 10047, 10028, 10002,| (a BrokerError)|                     |
| 10026, 10027, 10077)                                    |                |                     |
| refused a compare-and-set (wrong last sequence, 10071,  | Conflict       | re-read, try again  |
| or 10164 from a clustered stream)                       |                |                     |
| cannot place or change it now (no suitable peers 10005, | BrokerError    | nak'ed, 1 s         |
| a member change in progress 10202), though status 400   |                |                     |
| has no such stream, consumer, bucket, key, message (404)| BrokerNotFound | nak'ed,             |
|                                                         | (a BrokerError)| MISSING_DELAY       |
| does not let datumflow's user use a subject (a          | BrokerForbidden| nak'ed, FULL_DELAY  |
| permissions violation)                                  | (a BrokerError)|                     |
| refused the request (400): too large (10054, or over    | BrokerRefused  | dead-lettered       |
| max_payload), bad request, name taken, invalid subject  |                |                     |
| or key                                                  |                |                     |

A full broker is temporary, though it takes an operator to mend: the message being handled is
safe in its own stream, and once space is freed it goes on by itself. Dead-lettering it would
need an operator to replay every message that came meanwhile, and could not even succeed: the
dead letter needs the same storage. A refusal, by contrast, comes back the same however often
the request is made, so retrying it only hides it.

Anything else from nats-py (an API error of another status, an error of the client we have not
classified) is a BrokerError: a failure we have not seen must not drop a message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors

from datumflow.errors import (
    BrokerError,
    BrokerForbidden,
    BrokerFull,
    BrokerNotFound,
    BrokerRefused,
    Conflict,
    DatumflowError,
)

# Errors that mean "the broker did not answer", as opposed to a JetStream API refusal.
TRANSIENT = (
    asyncio.TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
    # A JetStream publish that found no stream listening: the stream has no leader (an election
    # after a server was lost takes seconds) or its server is restarting.
    nats.js.errors.NoStreamResponseError,
    ConnectionError,
)

FULL_DELAY = 30.0
"""Seconds before a message whose handling found the broker full is tried again: a full disk is
not freed in a second, and retrying every second would fill the log; work resumes at most this
long after an operator has made room."""

MISSING_DELAY = 10.0
"""Seconds before a message whose handling met a missing stream, consumer or bucket is tried
again: longer than a stream's leader election (4 to 9 s), in which a server may answer "not
found" for a stream it is still setting up."""

MAX_CONSUMERS = 10026
MAX_STREAMS = 10027

# JetStream's err_codes for "out of room", whatever status they come with (400, 500 or 503).
FULL = {
    10002: "resource limits exceeded for the account",
    10023: "insufficient resources",
    MAX_CONSUMERS: "maximum consumers limit reached",
    MAX_STREAMS: "maximum number of streams reached",
    10028: "insufficient memory resources available",
    10047: "insufficient storage resources available",
    # "maximum bytes exceeded", "maximum messages exceeded": a stream that discards new messages
    # when full (and other failures of a stream's store, which may pass too).
    10077: "the stream could not store the message",
}
STORE_FAILED = 10077
"""A stream's store failed: full ("maximum bytes exceeded", "maximum messages exceeded", ...),
or closed for a moment (see `refusal`)."""
WRONG_LAST_SEQUENCE = 10071
WRONG_LAST_SEQUENCE_CLUSTERED = 10164
"""A clustered stream's "wrong last sequence" when another write of the same key is in flight."""

# Status 400, yet they pass: the cluster cannot place the stream or consumer now (a server down,
# or one joining or leaving).
NOT_NOW = {
    10005: "no suitable peers for placement",
    10202: "cluster member change is in progress",
}
MESSAGE_TOO_LARGE = 10054

# Statuses of refusals that come back the same however often the request is made.
_REFUSED = {400, 403, 404, 413}

# The client refuses these itself, before anything is sent.
_CLIENT_REFUSALS = (
    nats.errors.MaxPayloadError,
    nats.errors.BadSubjectError,
    nats.errors.BadHeaderError,
    nats.js.errors.InvalidKeyError,
    nats.js.errors.InvalidBucketNameError,
)

PERMISSIONS = "permissions violation"
"""What the error the server sends says (in lower case) when the connection's user may not
publish or subscribe to a subject: nats-py hands it to the error callback, and nothing raises it."""


def refusal(what: str, *, code: int, err_code: int, description: str) -> DatumflowError:
    """The datumflow error for a JetStream API error answered to a request made for `what`."""
    words = f"{description or 'no description'}, code {code}, err_code {err_code}"
    if err_code == STORE_FAILED and not description.lower().startswith(("maximum", "insufficient")):
        # 10077 also wraps a stream store closed under a leader change or a shutdown: that
        # passes in seconds, and is no full broker to free space on.
        return BrokerError(f"{what}: the stream could not store it now ({words})")
    if err_code in FULL:
        if err_code in (MAX_CONSUMERS, MAX_STREAMS):
            advice = (
                "delete the streams or consumers no longer needed, or raise the account's"
                " max_streams or max_consumers"
            )
        else:
            advice = (
                "free space on its store, or raise the limit (the server's max_file_store or"
                " max_memory_store, the account's JetStream limits, the stream's max_bytes or"
                " max_msgs)"
            )
        return BrokerFull(
            f"{what}: the broker is full ({words}): {advice}; datumflow tries again every"
            f" {FULL_DELAY:.0f}s",
            delay=FULL_DELAY,
        )
    if err_code in (WRONG_LAST_SEQUENCE, WRONG_LAST_SEQUENCE_CLUSTERED):
        return Conflict(f"{what}: someone else wrote first ({words})")
    if err_code in NOT_NOW:
        return BrokerError(f"{what}: the broker cannot do it now ({words})")
    if code == 404:
        return BrokerNotFound(
            f"{what}: the broker has no such stream, consumer, bucket, key or message ({words})"
            " (`datumflow up` declares datumflow's streams and buckets when it starts, and"
            " `datumflow create pipeline` a pipeline's consumers); datumflow tries again every"
            f" {MISSING_DELAY:.0f}s",
            delay=MISSING_DELAY,
            code=code,
            err_code=err_code,
            description=description,
        )
    if code in _REFUSED:
        if err_code == MESSAGE_TOO_LARGE:
            advice = (
                "the message is larger than the stream accepts (its max_msg_size): make it"
                " smaller, or raise that limit"
            )
        else:
            advice = (
                "the broker will refuse it again; check that it is nats-server 2.10 or later,"
                " and that no stream or consumer of the same name was made differently"
            )
        return BrokerRefused(
            f"{what}: the broker refused ({words}): {advice}",
            code=code,
            err_code=err_code,
            description=description,
        )
    return BrokerError(f"{what}: the broker failed ({words})")


def translate(exc: BaseException, *, what: str) -> DatumflowError | None:
    """The datumflow error for `exc`, raised by nats-py while datumflow was doing `what`; None
    for an exception that is not nats-py's (it is let through as it is)."""
    if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError):
        return Conflict(f"{what}: someone else wrote first ({exc.description})")
    if isinstance(
        exc,
        (
            nats.js.errors.KeyNotFoundError,
            nats.js.errors.KeyDeletedError,
            nats.js.errors.NoKeysError,
        ),
    ):
        return BrokerNotFound(f"{what}: no such key", delay=MISSING_DELAY)
    if isinstance(exc, nats.js.errors.APIError) and not isinstance(
        exc, nats.js.errors.ServiceUnavailableError
    ):
        return refusal(
            what,
            code=getattr(exc, "code", None) or _status_of(exc),
            err_code=getattr(exc, "err_code", None) or 0,
            # nats-py raises some without the server's words (NoKeysError, ...): its own then.
            description=getattr(exc, "description", None) or str(exc) or type(exc).__name__,
        )
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        err_code = getattr(exc, "err_code", None) or 0
        if err_code in FULL:  # 10023 comes as a 503: full, not unavailable
            return refusal(what, code=503, err_code=err_code, description=exc.description or "")
    if isinstance(exc, TRANSIENT):
        return BrokerError(f"{what}: the broker did not answer ({type(exc).__name__})")
    if isinstance(exc, nats.errors.MaxPayloadError):
        return BrokerRefused(
            f"{what}: the message is larger than the broker accepts (its max_payload): make it"
            " smaller, or raise the server's max_payload"
        )
    if isinstance(exc, _CLIENT_REFUSALS):
        return BrokerRefused(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, nats.errors.Error):
        text = str(exc)
        if PERMISSIONS in text.lower():
            return permission_refused(what, text)
        return BrokerError(f"{what}: {type(exc).__name__}: {text}")
    return None


def _status_of(exc: nats.js.errors.APIError) -> int:
    """The status its class stands for, for an API error nats-py made without one (a bucket
    not found is raised as BucketNotFoundError(), with no code)."""
    if isinstance(exc, nats.js.errors.NotFoundError):
        return 404
    if isinstance(exc, nats.js.errors.BadRequestError):
        return 400
    return 0


def wrapped(exc: BaseException, *, what: str) -> DatumflowError:
    """`translate`, for an exception known to be the broker's: a BrokerError if it is not one
    this table knows."""
    return translate(exc, what=what) or BrokerError(f"{what}: {type(exc).__name__}: {exc}")


def permission_refused(what: str, text: str) -> BrokerForbidden:
    """The error for a permissions violation the server reported (`text`, its words)."""
    return BrokerForbidden(
        f"{what}: the broker refused ({text.removeprefix('nats: ')}): the user datumflow connects"
        " as may not use this subject; grant it publish and subscribe on df.>, $JS.>, $KV.> and"
        f" _INBOX.>, or connect as a user that has them; datumflow tries again every"
        f" {FULL_DELAY:.0f}s",
        delay=FULL_DELAY,
    )


@contextlib.asynccontextmanager
async def broker_errors(what: str) -> AsyncIterator[None]:
    """Turn the broker's own exceptions into datumflow errors naming what we were doing.

    Errors of datumflow pass through as they are: a nested `broker_errors` (or a local handler
    inside this one) has given them their meaning already."""
    try:
        yield
    except DatumflowError:
        raise
    except Exception as exc:
        error = translate(exc, what=what)
        if error is None:
            raise
        raise error from exc
