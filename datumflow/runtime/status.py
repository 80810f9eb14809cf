"""What `datumflow up` tells through its state directory: the local scaler's status (what it last
decided for each pipeline's workers: state, running and desired workers, lag), rewritten several
times a second in `<home>/status.json` and read by `list pipeline` and the console; and the URL its
console listens on (`<home>/console.json`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"

STATUS_FRESH_SECONDS = 10.0
"""An entry older than this was left by a supervisor that is gone: its worker counts are not
true any more."""


def read_status(home: str | Path, *, now: float | None = None) -> dict[str, dict[str, Any]]:
    """Per pipeline, what the local supervisor last wrote; {} where no fresh one is."""
    try:
        status = json.loads((Path(home) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(status, dict):
        return {}
    now = time.time() if now is None else now
    return {
        name: entry
        for name, entry in status.items()
        if isinstance(entry, dict) and now - entry.get("updated", 0) < STATUS_FRESH_SECONDS
    }


CONSOLE_FILE = "console.json"
"""The URL `up`'s console listens on, with its token (owner-readable only), written by the
console once it listens: what `up` prints."""


def write_console_url(home: str | Path, url: str) -> None:
    path = Path(home) / CONSOLE_FILE
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "pid": os.getpid()}, f)
    tmp.replace(path)


def read_console_url(home: str | Path) -> str:
    """The URL of `up`'s console; "" before it listens, or without one."""
    try:
        doc = json.loads((Path(home) / CONSOLE_FILE).read_text())
    except (OSError, ValueError):
        return ""
    url = doc.get("url", "") if isinstance(doc, dict) else ""
    return url if isinstance(url, str) else ""
