"""Retries over any object store: a StorageError ("may pass") is tried again with backoff.

Every operation of a content-addressed store is idempotent (a put of the same bytes lands on the same
key, a get has no effect), so trying again is always safe. Each function wraps its store in this
once, at its entry point; a StorageError that outlasts the retries goes up to the handler, which
naks its message (TemporaryError) and lets it come back later. NotFound and other permanent errors
are never retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from datumflow.errors import StorageError
from datumflow.metrics import current as current_metrics
from datumflow.storage.base import ObjectStore

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryingStore:
    def __init__(
        self,
        inner: ObjectStore,
        *,
        attempts: int = 6,
        first_delay: float = 0.05,
        max_delay: float = 2.0,
        function: str = "",
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.inner = inner
        self.url = inner.url
        self.attempts = attempts
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.retried = 0
        """How many calls were tried again (for tests and figures)."""
        self.function = function
        """The function this store serves, as its metrics name it."""

    def _count(self, *, retry: bool) -> None:
        metrics = current_metrics()
        if metrics is not None:
            metrics.store_errors.labels(function=self.function).inc()
            if retry:
                metrics.store_retries.labels(function=self.function).inc()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        delay = self.first_delay
        for attempt in range(1, self.attempts + 1):
            try:
                return await call()
            except StorageError as exc:
                self._count(retry=attempt < self.attempts)
                if attempt == self.attempts:
                    raise StorageError(f"{exc} (gave up after {attempt} attempts)") from exc
                self.retried += 1
                log.info("object store: %s: %s; trying again in %.2fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
        raise AssertionError("unreachable")

    async def put_file(self, path: Path) -> tuple[str, int]:
        return await self._call(f"storing {path}", lambda: self.inner.put_file(path))

    async def put_bytes(self, data: bytes) -> tuple[str, int]:
        return await self._call("storing an object", lambda: self.inner.put_bytes(data))

    async def get_file(self, key: str, dest: Path) -> int:
        return await self._call(f"reading {key}", lambda: self.inner.get_file(key, dest))

    async def get_bytes(self, key: str) -> bytes:
        return await self._call(f"reading {key}", lambda: self.inner.get_bytes(key))

    async def read(self, key: str) -> AsyncIterator[bytes]:
        # Only the start is retried: once bytes have gone to the caller, a failure is theirs.
        delay = self.first_delay
        for attempt in range(1, self.attempts + 1):
            stream = self.inner.read(key)
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                return
            except StorageError as exc:
                self._count(retry=attempt < self.attempts)
                if attempt == self.attempts:
                    raise StorageError(f"{exc} (gave up after {attempt} attempts)") from exc
                self.retried += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
                continue
            yield first
            async for chunk in stream:
                yield chunk
            return

    async def exists(self, key: str) -> bool:
        return await self._call(f"looking for {key}", lambda: self.inner.exists(key))

    async def delete(self, key: str) -> None:
        await self._call(f"deleting {key}", lambda: self.inner.delete(key))

    async def flush(self) -> None:
        # Not retried: a failed fsync may have dropped the data it was to keep (the puts are
        # what has to be done again, and the datums they belong to are).
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()
