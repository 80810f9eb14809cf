"""Everything datumflow says to and keeps in NATS JetStream.

nats-py imports aiohttp whenever it is installed (it is, for the S3 client), only to offer ws://
URLs, which datumflow does not use; that import is over 100 ms of every command's start. So nats-py
is loaded here, first, with aiohttp hidden; aiohttp itself still loads for whoever needs it later.
"""

from __future__ import annotations

import sys


def _load_nats_without_websockets() -> None:
    if "nats" in sys.modules or "aiohttp" in sys.modules:
        return
    sys.modules["aiohttp"] = None  # type: ignore[assignment]  # makes `import aiohttp` fail
    try:
        import nats  # noqa: F401
    finally:
        del sys.modules["aiohttp"]


_load_nats_without_websockets()
