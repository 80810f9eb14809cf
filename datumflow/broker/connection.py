"""The connection to NATS: authentication, TLS, and the boundary where broker errors are wrapped.

Every function gets a `Broker` from `connect(settings=...)` at its entry point and passes it down;
there is no module-level default connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as Subscription  # core NATS, for the CLI
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from datumflow.broker.nats_errors import (
    MISSING_DELAY,
    PERMISSIONS,
    permission_refused,
    translate,
)
from datumflow.broker.nats_errors import TRANSIENT as TRANSIENT
from datumflow.broker.nats_errors import broker_errors as broker_errors
from datumflow.broker.subjects import JS_API
from datumflow.errors import BrokerError, BrokerFull, BrokerNotFound, BrokerRefused
from datumflow.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

PUBLISH_PATIENCE = 60.0
"""Seconds a publish is retried before it fails: long enough for a stream's leader election
(4 to 9 s after a leader dies) and a server restart, well inside the streams' 120 s
de-duplication window, so that every retry of one message is stored at most once."""
PING_INTERVAL = 5.0
"""Seconds between the client's pings to its server (see `connect`)."""
PUBLISH_ATTEMPT = 5.0
"""Seconds one attempt waits for the stream's answer: a request sent to a leader that has just
died is never answered, and the next attempt finds the new one."""


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not (settings.nats_tls_ca or settings.nats_tls_cert):
        return None
    try:
        ctx = ssl.create_default_context(cafile=settings.nats_tls_ca or None)
        if settings.nats_tls_cert:
            ctx.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(
            f"cannot load the broker TLS files (DATUMFLOW_NATS_TLS_CA={settings.nats_tls_ca!r},"
            f" _TLS_CERT={settings.nats_tls_cert!r}, _TLS_KEY={settings.nats_tls_key!r}): {exc}"
        ) from None
    return ctx


def redact(url: str) -> str:
    """A broker URL fit for a log line or an error: any user:password@ is masked."""
    return re.sub(r"(?<=://)[^/@]+@", "***@", url)


def _auth_options(settings: Settings) -> dict[str, Any]:
    """nats-py's connect options for the credentials the settings give."""
    options: dict[str, Any] = {}
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password
    if settings.nats_token:
        options["token"] = settings.nats_token
    if settings.nats_creds or settings.nats_nkey_seed:
        if importlib.util.find_spec("nkeys") is None:
            raise BrokerError(
                "NKEY and creds-file authentication need the `nkeys` package, which is not"
                " installed: pip install 'nats-py[nkeys]'"
            )
    if settings.nats_creds:
        if not Path(settings.nats_creds).is_file():
            raise BrokerError(
                f"DATUMFLOW_NATS_CREDS names {settings.nats_creds}, which is not a readable file"
            )
        options["user_credentials"] = settings.nats_creds
    if settings.nats_nkey_seed:
        seed = settings.nats_nkey_seed.strip()
        # The seed itself ("SU..."), or a file holding it.
        if seed.startswith("SU") and "/" not in seed:
            options["nkeys_seed_str"] = seed
        elif Path(seed).is_file():
            options["nkeys_seed"] = seed
        else:
            raise BrokerError(
                "DATUMFLOW_NATS_NKEY_SEED is neither a user seed (SU...) nor a readable file"
            )
    return options


class _StreamNames(msgspec.Struct):
    streams: list[str] | None = None
    error: dict[str, object] | None = None


class Violations:
    """The permissions violations the server reported on a connection, lately: it sends them
    on the side, for a publish or a subscription it drops, and nothing raises them."""

    KEPT = 32

    def __init__(self) -> None:
        self._seen: list[tuple[float, str]] = []

    def note(self, text: str) -> None:
        self._seen.append((asyncio.get_running_loop().time(), text))
        del self._seen[: -self.KEPT]

    def since(self, when: float, subject: str) -> str:
        """The last violation reported for `subject` since `when` (loop time); "" if none."""
        quoted = f'"{subject}"'
        for at, text in reversed(self._seen):
            if at < when:
                break
            if quoted in text:
                return text
        return ""


class Broker:
    """A NATS connection with its JetStream context and the KV buckets opened so far."""

    def __init__(
        self, nc: Client, *, name: str, replicas: int = 1, violations: Violations | None = None
    ) -> None:
        self.nc = nc
        self.replicas = replicas
        """Replicas of each stream and bucket this connection declares (DATUMFLOW_REPLICAS)."""
        self.js: JetStreamContext = nc.jetstream(timeout=10)
        self.name = name
        self.violations = violations if violations is not None else Violations()
        self._buckets: dict[str, KeyValue] = {}

    async def kv(self, bucket: str) -> KeyValue:
        kv = self._buckets.get(bucket)
        if kv is None:
            async with broker_errors(f"opening KV bucket {bucket}"):
                kv = await self.js.key_value(bucket)
            self._buckets[bucket] = kv
        return kv

    async def publish(
        self,
        subject: str,
        message: msgspec.Struct | bytes,
        *,
        msg_id: str,
        patience: float = PUBLISH_PATIENCE,
    ) -> int:
        """Publish to JetStream and wait for the stream to store it; returns the sequence.

        A publish the stream does not answer (no leader during an election, a server restarting,
        a lost answer) is sent again with the same Nats-Msg-Id until it is answered or `patience`
        runs out: the stream stores it once however many tries reach it. nats-py itself does not
        retry, and the server answers "no responders" at once while a stream has no leader."""
        payload = message if isinstance(message, bytes) else msgspec.json.encode(message)
        what = f"publishing to {subject}"
        if len(payload) > self.nc.max_payload:
            raise BrokerRefused(
                f"{what}: the message is {len(payload)} bytes, over the broker's max_payload of"
                f" {self.nc.max_payload} bytes: make it smaller, or raise the server's max_payload",
                code=413,
            )
        headers = {"Nats-Msg-Id": msg_id}
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + patience
        delay = 0.05
        tries = 0
        while True:
            tries += 1
            left = deadline - loop.time()
            try:
                ack = await self.js.publish(
                    subject, payload, headers=headers, timeout=max(min(PUBLISH_ATTEMPT, left), 0.1)
                )
                if tries > 1:
                    log.info("publishing to %s: stored after %d tries", subject, tries)
                return ack.seq
            except TRANSIENT as exc:
                full = translate(exc, what=what)
                if isinstance(full, BrokerFull):
                    raise full from exc  # waited out by a nak with its delay, not here
                # A subject the user may not publish to is dropped by the server, which says so
                # on the side (the error callback): the request itself just goes unanswered.
                refused = self.violations.since(started, subject)
                if refused:
                    raise permission_refused(what, refused) from exc
                left = deadline - loop.time()
                if left <= 0 or self.nc.is_closed:
                    raise BrokerError(
                        f"publishing to {subject}: the stream did not answer {tries} tries in"
                        f" {patience:.0f}s ({type(exc).__name__}); check that a majority of the"
                        " broker's servers are up"
                    ) from exc
                if isinstance(exc, nats.js.errors.NoStreamResponseError) and not (
                    await self._captured(subject)
                ):
                    # Waiting out the patience cannot mend this one; `datumflow up` can, so the
                    # message being handled waits (MISSING_DELAY) rather than be dead-lettered.
                    raise BrokerNotFound(
                        f"{what}: no stream captures this subject (`datumflow up` declares"
                        f" datumflow's streams when it starts); tried again every"
                        f" {MISSING_DELAY:.0f}s",
                        delay=MISSING_DELAY,
                    ) from exc
                if tries == 1:
                    log.warning("publishing to %s: %s; retrying", subject, type(exc).__name__)
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 1.0)
            except nats.errors.Error as exc:  # the stream refused it: too large, a bad header
                raise (translate(exc, what=what) or BrokerError(f"{what}: {exc}")) from exc

    async def _captured(self, subject: str) -> bool:
        """Whether some stream captures `subject`: "no responders" means the stream has no
        leader just now, or that there is no stream at all, which waiting cannot mend. True when
        the broker cannot tell (its metadata leader is being elected too)."""
        request = msgspec.json.encode({"subject": subject})
        try:
            answer = await self.nc.request(f"{JS_API}.STREAM.NAMES", request, timeout=2)
            names = msgspec.json.decode(answer.data, type=_StreamNames)
        except (*TRANSIENT, msgspec.DecodeError):
            return True
        return names.error is not None or bool(names.streams)

    async def publish_core(self, subject: str, data: bytes) -> None:
        """Publish on core NATS: not stored, lost if no one listens (live output)."""
        async with broker_errors(f"publishing to {subject}"):
            await self.nc.publish(subject, data)

    async def subscribe(
        self, subject: str, *, cb: Callable[[Msg], Awaitable[None]]
    ) -> Subscription:
        """A core NATS subscription (nothing kept: live output); `cb` gets each message."""
        async with broker_errors(f"subscribing to {subject}"):
            return await self.nc.subscribe(subject, cb=cb)

    async def retry(self, what: str, call: Callable[[], Awaitable[T]], *, attempts: int = 30) -> T:
        """Call `call`, retrying BrokerError with backoff: rides out a broker restart."""
        delay = 0.1
        for attempt in range(attempts):
            try:
                return await call()
            except BrokerError as exc:
                if attempt == attempts - 1:
                    raise
                log.warning("%s: %s; retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.drain()
        with contextlib.suppress(Exception):
            await self.nc.close()


async def connect(*, settings: Settings, name: str, reconnect: bool = True) -> Broker:
    """Connect with the credentials and TLS the settings name; raise BrokerError if we cannot."""
    url = settings.nats_url
    if not url:
        raise BrokerError(
            "no broker to connect to: start one with `datumflow up` or set DATUMFLOW_NATS_URL"
        )
    options: dict[str, Any] = {
        "servers": [u.strip() for u in url.split(",")],
        "name": name,
        # A few tries for the first connection, so that a wrong password or address comes back
        # as an error (callers retry with their own patience); once connected, reconnect forever.
        # (nats-py reads 0 as "no limit" while it picks a server: a CLI would wait forever.)
        "max_reconnect_attempts": 2 if reconnect else 1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
        # A server that dies with its host, or is cut off, sends nothing: the connection is seen
        # to be dead only when pings go unanswered, after 2 x 120 s by nats-py's defaults. At
        # these, a client moves to another server of a cluster within about 15 s.
        "ping_interval": PING_INTERVAL,
        "max_outstanding_pings": 3,
        "allow_reconnect": reconnect,
    }
    errors: list[Exception] = []

    violations = Violations()

    async def _on_error(exc: Exception) -> None:
        errors.append(exc)
        del errors[:-1]
        if PERMISSIONS in str(exc).lower():
            violations.note(str(exc))
        log.warning("broker connection: %s", _why(exc))

    options["error_cb"] = _on_error
    options.update(_auth_options(settings))
    tls = _tls_context(settings)
    if tls is not None:
        options["tls"] = tls
    shown = ", ".join(redact(u) for u in options["servers"])
    try:
        nc = await nats.connect(**options)
    except nats.errors.NoServersError as exc:
        if errors and not isinstance(errors[-1], (*TRANSIENT, nats.errors.NoServersError)):
            raise BrokerError(
                f"connecting to the broker at {shown} failed: {_why(errors[-1])}"
            ) from exc
        raise BrokerError(
            f"cannot reach the broker at {shown}: is `datumflow up` running?"
        ) from exc
    except TRANSIENT as exc:
        raise BrokerError(f"cannot reach the broker at {shown}: {type(exc).__name__}") from exc
    except Exception as exc:
        # Authorization violations and TLS failures come through here: not worth retrying.
        raise BrokerError(f"connecting to the broker at {shown} failed: {_why(exc)}") from exc
    if reconnect:
        nc.options["max_reconnect_attempts"] = -1
    return Broker(nc, name=name, replicas=settings.replicas, violations=violations)


def _why(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, nats.errors.SecureConnRequiredError):
        return "the broker requires TLS: set DATUMFLOW_NATS_TLS_CA to the CA that signed its certificate"
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in text.lower():
        return (
            "the broker refused our credentials (authorization violation): check"
            " DATUMFLOW_NATS_USER/PASSWORD, _TOKEN, _CREDS or _NKEY_SEED"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({text}): check DATUMFLOW_NATS_TLS_CA and the broker's certificate"
    return text
