"""Typed access to the KV buckets: create-only writes, compare-and-set updates, listings that
leave nothing behind on the server, and watches (`watch`) that speak datumflow's errors.

Every write is sent again while the broker does not answer it (`_resend`), for up to
PUBLISH_PATIENCE seconds, which is safe for each kind: a put or a delete sets what it sets again;
a create or a compare-and-set whose first try was applied with its answer lost is refused on the
next try ("wrong last sequence"), and is then recognised as ours when the key holds our very
bytes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, NamedTuple, TypeVar, cast

import msgspec
import nats.errors
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    NoStreamResponseError,
    ServiceUnavailableError,
)
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from datumflow.broker import subjects
from datumflow.broker.connection import PUBLISH_PATIENCE, TRANSIENT, Broker, broker_errors
from datumflow.broker.nats_errors import refusal
from datumflow.errors import BrokerError, BrokerRefused, Conflict, NotFound

log = logging.getLogger(__name__)
R = TypeVar("R", bound=msgspec.Struct)
T = TypeVar("T")

GETS_AT_ONCE = 64
"""Keys read concurrently by a listing: one burst of requests, not one round trip per key."""


class _Subjects(msgspec.Struct):
    subjects: dict[str, int] | None = None


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _StreamSubjects(msgspec.Struct):
    """The part of a JetStream STREAM.INFO answer a listing reads (one page of subjects)."""

    state: _Subjects | None = None
    total: int = 0
    error: _ApiError | None = None


class Records(Generic[R]):
    """One bucket holding one record type."""

    def __init__(self, broker: Broker, *, bucket: str, type: type[R]) -> None:
        self.broker = broker
        self.bucket = bucket
        self.type = type

    async def get(self, key: str) -> tuple[R, int]:
        """The record and its revision; NotFound if absent."""
        kv = await self.broker.kv(self.bucket)
        async with broker_errors(f"reading {self.bucket}/{key}"):
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                raise NotFound(f"{key} not found in {self.bucket}") from None
        if entry.value is None or entry.value == b"":
            raise NotFound(f"{key} not found in {self.bucket}")
        return msgspec.json.decode(entry.value, type=self.type), entry.revision or 0

    async def find(self, key: str) -> R | None:
        try:
            return (await self.get(key))[0]
        except NotFound:
            return None

    async def create(self, key: str, record: R) -> bool:
        """Write only if absent; False if the key already exists (idempotent retries)."""
        kv = await self.broker.kv(self.bucket)
        payload = msgspec.json.encode(record)
        async with broker_errors(f"creating {self.bucket}/{key}"):
            try:
                await _resend(self.broker, kv, key, payload, lambda: kv.create(key, payload))
            except KeyWrongLastSequenceError:
                return False
        return True

    async def put(self, key: str, record: R) -> None:
        kv = await self.broker.kv(self.bucket)
        payload = msgspec.json.encode(record)
        async with broker_errors(f"writing {self.bucket}/{key}"):
            await _resend(self.broker, kv, key, payload, lambda: kv.put(key, payload))

    async def swap(self, key: str, record: R, *, revision: int) -> int:
        """Compare-and-set: write only if the record is still at `revision`; Conflict otherwise."""
        kv = await self.broker.kv(self.bucket)
        payload = msgspec.json.encode(record)
        async with broker_errors(f"updating {self.bucket}/{key}"):
            try:
                return await _resend(
                    self.broker, kv, key, payload, lambda: kv.update(key, payload, last=revision)
                )
            except KeyWrongLastSequenceError:
                raise Conflict(f"{self.bucket}/{key} changed under us") from None

    async def update(self, key: str, change: Callable[[R], R | None]) -> R:
        """Read, change, compare-and-set, again until no one raced us. `change` returning None
        means "nothing to do" and leaves the record as it is."""
        while True:
            current, revision = await self.get(key)
            new = change(current)
            if new is None:
                return current
            try:
                await self.swap(key, new, revision=revision)
                return new
            except Conflict:
                continue

    async def delete(self, key: str) -> None:
        kv = await self.broker.kv(self.bucket)
        async with broker_errors(f"deleting {self.bucket}/{key}"):
            try:
                await _resend(self.broker, kv, key, None, lambda: kv.delete(key))
            except KeyNotFoundError:
                pass

    async def history(self, key: str) -> list[R]:
        """The values `key` has had that the bucket still keeps, oldest first (deletes and
        values that no longer decode left out); [] for a key it has none of."""
        kv = await self.broker.kv(self.bucket)
        async with broker_errors(f"reading the history of {self.bucket}/{key}"):
            try:
                entries = await kv.history(key)
            except (KeyNotFoundError, NoKeysError):
                return []
        out: list[R] = []
        for entry in entries:
            if not entry.value:
                continue
            try:
                out.append(msgspec.json.decode(entry.value, type=self.type))
            except msgspec.MsgspecError:
                continue  # written by an older datumflow
        return out

    async def keys(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` ("pipeline." for one pipeline's jobs), deleted ones left out."""
        return [key for key, _ in await self._latest(prefix)]

    async def all(self, prefix: str = "") -> list[R]:
        return [
            msgspec.json.decode(value, type=self.type)
            for _, value in await self._latest(prefix)
            if value
        ]

    # Listing reads the bucket's stream directly: the subjects it holds (STREAM.INFO with a
    # subject filter, by subject wildcard: nats-py's own `keys(filters=...)` matches substrings,
    # which would mix up `copy` and `copy2`), then the last message of each. A KV watch, which is
    # what nats-py lists with, makes an ephemeral consumer that the server keeps for minutes after
    # the watch is stopped: listings many times a second (the supervisor's tick, the planner's
    # loop) piled up thousands of them. Reading records costs what watch + read did (one round
    # trip, then a read per key, now sent a burst at a time), listing keys alone a read per key
    # more (only deletes do that), and nothing is left on the server. A long-lived watch serving
    # listings from memory would cost less, but a listing could then miss a write this very
    # process has just made.

    async def _latest(self, prefix: str) -> list[tuple[str, bytes]]:
        """(key, value) of every key under `prefix` whose last operation is not a delete."""
        kv = await self.broker.kv(self.bucket)
        names = await self._names(prefix)
        out: list[tuple[str, bytes]] = []
        async with broker_errors(f"listing {self.bucket}"):
            for start in range(0, len(names), GETS_AT_ONCE):
                chunk = names[start : start + GETS_AT_ONCE]
                values = await asyncio.gather(*(_value(kv, key) for key in chunk))
                out += [(k, v) for k, v in zip(chunk, values, strict=True) if v is not None]
        return sorted(out)

    async def _names(self, prefix: str) -> list[str]:
        """Every key under `prefix` the bucket's stream holds a message for, deleted or not."""
        head = subjects.kv_key_prefix(self.bucket)
        request = {"subjects_filter": subjects.kv_keys(self.bucket, prefix), "offset": 0}
        names: list[str] = []
        async with broker_errors(f"listing {self.bucket}"):
            while True:
                answer = await self.broker.nc.request(
                    f"{subjects.JS_API}.STREAM.INFO.{subjects.kv_stream(self.bucket)}",
                    msgspec.json.encode(request),
                    timeout=10,
                )
                page = msgspec.json.decode(answer.data, type=_StreamSubjects)
                if page.error is not None:
                    raise refusal(
                        f"listing {self.bucket}",
                        code=page.error.code,
                        err_code=page.error.err_code,
                        description=page.error.description,
                    )
                found = list((page.state.subjects if page.state else None) or {})
                names += [subject.removeprefix(head) for subject in found]
                request["offset"] = len(names)
                # The server sends the subjects a page at a time (100,000 of them).
                if not found or len(names) >= page.total:
                    break
        return names


async def _resend(
    broker: Broker,
    kv: KeyValue,
    key: str,
    payload: bytes | None,
    write: Callable[[], Awaitable[T]],
) -> T:
    """Make a KV write, again while the broker does not answer it, for up to PUBLISH_PATIENCE.

    "No responders" (the stream has no leader, as during an election after a server was lost) and
    "temporarily unavailable" did not apply the write. No answer at all (a timeout, a connection
    lost) may have: the write is sent again all the same, and if that try is refused with "wrong
    last sequence" (a create or a compare-and-set finding its own first try), the key is read: when
    it holds `payload`, the write was ours and has landed; its revision is returned. Otherwise the
    refusal stands (someone else wrote in between). Once the patience is spent, or the connection
    closed for good, the last error comes out (as BrokerError, through `broker_errors`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PUBLISH_PATIENCE
    delay = 0.05
    unheard = False
    while True:
        try:
            return await write()
        except (NoStreamResponseError, ServiceUnavailableError):
            if loop.time() > deadline:
                raise
        except KeyWrongLastSequenceError:
            if unheard and payload is not None:
                revision = await _holding(kv, key, payload)
                if revision is not None:
                    return cast(T, revision)
            raise
        except TRANSIENT:
            if loop.time() > deadline or broker.nc.is_closed:
                raise
            unheard = True
            log.warning("writing %s: no answer from the broker; sending it again", key)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def _holding(kv: KeyValue, key: str, payload: bytes) -> int | None:
    """The revision of `key` if its last value is `payload`; None if not (or unreadable)."""
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, *TRANSIENT):
        return None
    if entry.operation in (KV_DEL, KV_PURGE) or entry.value != payload:
        return None
    return entry.revision or 0


async def _value(kv: KeyValue, key: str) -> bytes | None:
    """The value of `key`; None if it was deleted since it was listed."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:  # deleted or purged (nats-py's KeyDeletedError comes as this)
        return None
    if entry.operation in (KV_DEL, KV_PURGE):
        return None
    return entry.value or b""


WATCH_LINGER = 30.0
"""Seconds the server keeps a watch's consumer once nobody listens to it. nats-py's default, five
minutes, leaves one behind for each watch reopened (the controller's resync every 30 s)."""


class Change(NamedTuple):
    """One entry a watch reports."""

    key: str
    value: bytes
    """b"" for a delete."""
    revision: int
    deleted: bool


class Watch:
    """A watch on a bucket: its current entries, then None (all current ones sent), then each
    change as it is made. Broker failures come as BrokerError."""

    def __init__(self, watcher: KeyValue.KeyWatcher) -> None:
        self._watcher = watcher

    async def next(self, *, timeout: float) -> Change | None:
        """The next entry, or None once the current entries are all sent; TimeoutError if nothing
        came within `timeout` seconds."""
        try:
            entry = await self._watcher.updates(timeout=timeout)
        except nats.errors.TimeoutError:
            raise TimeoutError(f"no change within {timeout:.1f}s") from None
        except (*TRANSIENT, nats.errors.Error) as exc:
            raise BrokerError(f"watching a bucket: {type(exc).__name__}: {exc}") from exc
        if entry is None:
            return None
        deleted = entry.operation in (KV_DEL, KV_PURGE)
        return Change(entry.key, entry.value or b"", entry.revision or 0, deleted)

    async def stop(self) -> None:
        try:
            await self._watcher.stop()
        except Exception:
            pass  # the connection is gone already, and the watch with it


async def watch(broker: Broker, bucket: str, keys: str = ">") -> Watch:
    """Watch the keys of `bucket` matching `keys` (a subject wildcard)."""
    try:
        kv = await broker.kv(bucket)
        async with broker_errors(f"watching {bucket}"):
            return Watch(await kv.watch(keys, inactive_threshold=WATCH_LINGER))
    except BrokerRefused as exc:
        # A watcher watches again after a pause (the controller's pipelines): a bucket that is
        # not there yet is declared by the next `datumflow up`, and the watch then starts.
        raise BrokerError(str(exc)) from exc
