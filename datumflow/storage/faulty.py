"""An object store that misbehaves on purpose: latency, errors and crashes, over a real store.

Selected by the `storage_faults` setting (DATUMFLOW_STORAGE_FAULTS), for fault tests and chaos runs;
the real store underneath does the real work. The setting is a comma-separated list:

    latency=0.05       seconds added to every operation
    jitter=0.05        up to this many more seconds, at random
    errors=0.1         probability that an operation fails with StorageError; half of the injected
                       errors come before the real call, half after it (the write happened, the
                       answer was lost), so callers must be idempotent
    seed=7             seed of the random choices (per process: the pid is mixed in)
    crash=committer:put_bytes:2
                       SIGKILL the process named `committer` right after its 2nd successful
                       `put_bytes`, once per state directory (a marker file remembers it)

Every injected error and crash is appended as one line to `<record_dir>/injected.log`, so a test
can count the faults that really happened.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from datumflow.errors import StorageError
from datumflow.storage.base import ObjectStore

OPERATIONS = ("put_file", "put_bytes", "get_file", "get_bytes", "read", "exists", "delete")


class Crash(msgspec.Struct, frozen=True, kw_only=True):
    function: str
    operation: str
    count: int


class FaultSpec(msgspec.Struct, frozen=True, kw_only=True):
    latency: float = 0.0
    jitter: float = 0.0
    errors: float = 0.0
    seed: int | None = None
    crash: Crash | None = None


def parse_faults(text: str) -> FaultSpec:
    """Parse the `storage_faults` setting; ValueError names the part that is wrong."""
    values: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, raw = part.partition("=")
        if not sep:
            raise ValueError(f"storage_faults: {part!r} is not NAME=VALUE")
        try:
            if name in ("latency", "jitter", "errors"):
                values[name] = float(raw)
            elif name == "seed":
                values[name] = int(raw)
            elif name == "crash":
                function, operation, count = raw.split(":")
                values[name] = Crash(function=function, operation=operation, count=int(count))
            else:
                raise ValueError(f"unknown fault {name!r} (latency, jitter, errors, seed, crash)")
        except ValueError as exc:
            raise ValueError(f"storage_faults: {part!r}: {exc}") from None
    spec = FaultSpec(**values)
    if not 0.0 <= spec.errors <= 1.0:
        raise ValueError(f"storage_faults: errors={spec.errors} must be a probability in [0, 1]")
    if spec.latency < 0 or spec.jitter < 0:
        raise ValueError("storage_faults: latency and jitter must be >= 0 seconds")
    if spec.crash is not None and spec.crash.operation not in OPERATIONS:
        raise ValueError(
            f"storage_faults: crash operation {spec.crash.operation!r} is not one of"
            f" {', '.join(OPERATIONS)}"
        )
    return spec


class FaultyStore:
    """Wraps an ObjectStore; see the module docstring for what it does to it."""

    def __init__(
        self, inner: ObjectStore, *, spec: FaultSpec, function: str, record_dir: Path
    ) -> None:
        self.inner = inner
        self.url = inner.url
        self.spec = spec
        self.function = function
        self.record_dir = record_dir
        self.random = random.Random(
            None if spec.seed is None else spec.seed * 1_000_003 + os.getpid()
        )
        self.calls: dict[str, int] = dict.fromkeys(OPERATIONS, 0)
        record_dir.mkdir(parents=True, exist_ok=True)

    def __getattr__(self, name: str) -> Any:
        # Backend extras (S3Store.get_source, ...) pass through untouched.
        return getattr(self.inner, name)

    def _record(self, what: str) -> None:
        line = f"{time.time():.3f} {self.function} {os.getpid()} {what}\n".encode()
        fd = os.open(self.record_dir / "injected.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    async def _before(self, operation: str) -> bool:
        """Delay; maybe fail now; return whether to fail after the real call instead."""
        delay = self.spec.latency + self.random.random() * self.spec.jitter
        if delay:
            await asyncio.sleep(delay)
        if self.spec.errors and self.random.random() < self.spec.errors:
            if self.random.random() < 0.5:
                self._record(f"error-before {operation}")
                raise StorageError(f"injected fault: {operation} failed before reaching the store")
            return True
        return False

    def _after(self, operation: str, fail: bool) -> None:
        self.calls[operation] += 1
        crash = self.spec.crash
        if (
            crash is not None
            and crash.function == self.function
            and crash.operation == operation
            and crash.count == self.calls[operation]
        ):
            marker = self.record_dir / f"crashed-{crash.function}-{operation}-{crash.count}"
            try:
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                pass  # crashed here once already: this run goes on
            else:
                os.close(fd)
                self._record(f"crash {operation}#{crash.count}")
                os.kill(os.getpid(), signal.SIGKILL)
        if fail:
            self._record(f"error-after {operation}")
            raise StorageError(f"injected fault: {operation} succeeded but the answer was lost")

    async def put_file(self, path: Path) -> tuple[str, int]:
        fail = await self._before("put_file")
        result = await self.inner.put_file(path)
        self._after("put_file", fail)
        return result

    async def put_bytes(self, data: bytes) -> tuple[str, int]:
        fail = await self._before("put_bytes")
        result = await self.inner.put_bytes(data)
        self._after("put_bytes", fail)
        return result

    async def get_file(self, key: str, dest: Path) -> int:
        fail = await self._before("get_file")
        result = await self.inner.get_file(key, dest)
        self._after("get_file", fail)
        return result

    async def get_bytes(self, key: str) -> bytes:
        fail = await self._before("get_bytes")
        result = await self.inner.get_bytes(key)
        self._after("get_bytes", fail)
        return result

    async def read(self, key: str) -> AsyncIterator[bytes]:
        fail = await self._before("read")
        async for chunk in self.inner.read(key):
            yield chunk
        self._after("read", fail)

    async def exists(self, key: str) -> bool:
        fail = await self._before("exists")
        result = await self.inner.exists(key)
        self._after("exists", fail)
        return result

    async def delete(self, key: str) -> None:
        fail = await self._before("delete")
        await self.inner.delete(key)
        self._after("delete", fail)

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()
