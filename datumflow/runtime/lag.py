"""Where the local scaler reads a pipeline's lag: nats-server's monitoring endpoint, as KEDA reads it."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request

log = logging.getLogger(__name__)


async def read_jsz(monitor_url: str) -> dict | None:
    """The /jsz document of the broker's monitoring endpoint; None (logged) when it cannot be read."""
    url = f"http://{monitor_url}/jsz?acc=$G&config=true&consumers=true"
    try:
        return await asyncio.to_thread(_get_json, url)
    except (OSError, ValueError) as exc:
        log.warning("reading lag from %s: %s", url, exc)
        return None


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.loads(resp.read())
