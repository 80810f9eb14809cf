"""Where the local scaler reads a pipeline's lag: nats-server's monitoring endpoint, as KEDA reads it."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from typing import Any

log = logging.getLogger(__name__)


async def read_jsz(monitor_url: str) -> dict[str, Any] | None:
    """The /jsz document of the broker's monitoring endpoint; None (logged) when it cannot be read."""
    url = f"http://{monitor_url}/jsz?acc=$G&config=true&consumers=true"
    try:
        return await asyncio.to_thread(_get_json, url)
    except (OSError, ValueError) as exc:
        log.warning("reading lag from %s: %s", url, exc)
        return None


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2) as resp:
        doc = json.loads(resp.read())
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
    return doc
