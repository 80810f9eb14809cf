"""What the bench needs besides datumflow: Celery (the `bench` extra) and Debian's redis-server."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ensure_celery() -> None:
    """Install the `bench` extra into this interpreter's environment when Celery is missing."""
    if importlib.util.find_spec("celery") and importlib.util.find_spec("redis"):
        return
    print("bench: installing the bench extra (celery[redis]) ...", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-e", f"{ROOT}[bench]"], check=True
    )
    importlib.invalidate_caches()


def redis_server() -> str:
    """The redis-server binary; installed with apt-get when missing and we are root on Debian."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench: installing redis-server with apt-get ...", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True)
        found = shutil.which("redis-server")
        if found:
            return found
    raise SystemExit(
        "bench: redis-server is not installed; `apt-get install redis-server` (Debian) or put one"
        " on PATH"
    )
