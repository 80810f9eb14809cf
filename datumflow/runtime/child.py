"""One supervised child process of `datumflow up`: started, restarted with a backoff when it dies,
told to stop with SIGTERM and killed past its deadline.

A child runs the same entry point a container runs (`datumflow planner`, `committer`, `ingest`,
`worker --pipeline NAME`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path

from datumflow.runtime.embedded import stop_with_parent

log = logging.getLogger(__name__)


class Child:
    """One supervised process: restarted when it dies, stopped with SIGTERM."""

    healthy_after = 30.0
    """A child that ran this long before dying was not crash-looping: it comes back at once."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], log_file: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_file = log_file
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.next_start = 0.0
        self.stopping = False
        self.stop_timeout = 10.0
        """Seconds between SIGTERM and SIGKILL at shutdown."""
        self.kill_at: float | None = None
        """When a child told to stop on its own (a scale-down) is killed if still alive."""
        self.index = 0
        self.busy_file: Path | None = None
        """Where a worker says it holds a datum (the file exists) or not."""

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        if self.busy_file is not None:
            # Left by a predecessor that died holding a datum.
            self.busy_file.unlink(missing_ok=True)
        with open(self.log_file, "ab") as out:  # noqa: ASYNC230 - a local append-open
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                # If `datumflow up` is SIGKILLed, its functions and workers stop too instead of
                # running on unsupervised.
                preexec_fn=stop_with_parent(),
            )
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    async def keep_alive(self) -> None:
        if self.stopping or self.alive or time.monotonic() < self.next_start:
            return
        if self.process is not None:
            if time.monotonic() - self.started_at >= self.healthy_after:
                self.restarts = 0
            self.restarts += 1
            log.warning(
                "%s exited with code %s; restarting (restart %d)",
                self.name,
                self.process.returncode,
                self.restarts,
            )
            # Back off from a crash loop, but come back fast from a one-off death.
            self.next_start = time.monotonic() + min(0.2 * 2 ** min(self.restarts, 6), 10)
            self.process = None
            return
        await self.start()

    def terminate(self, *, kill_at: float | None = None) -> None:
        if self.alive and not self.stopping:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        self.stopping = True
        self.kill_at = kill_at

    def reap(self) -> bool:
        """For a child told to stop: True while it is alive; killed once past its deadline."""
        if not self.alive:
            if self.busy_file is not None:
                self.busy_file.unlink(missing_ok=True)
            return False
        if self.kill_at is not None and time.monotonic() > self.kill_at:
            assert self.process is not None
            log.warning("%s did not stop in time; killing it", self.name)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        return True

    async def wait(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            await asyncio.wait_for(self.process.wait(), timeout=timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
