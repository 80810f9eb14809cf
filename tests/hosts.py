"""Several hosts on one machine: Linux network namespaces joined by veth pairs and a bridge.

Each host is a network namespace with its own address on a private /24 (10.213.N.0/24, N chosen
free on this machine) and its own loopback; the bridge joins them, and carries the address .254
so that the test process itself can reach them. Nothing is routed anywhere else: traffic stays
between our own namespaces and this process. The filesystem is shared (namespaces isolate only the
network), so hosts read the same binaries and write their logs under the test's directory.

Every namespace and link is named `dfh<pid>...` after the process that made it. A run removes
everything it made on the way out, even after a failed test (`Hosts` is a context manager, and the
pytest fixture tears down in `finally`); a run that was killed before it could is swept by the next
one: whatever carries the name of a process that no longer exists is removed, with the processes
left inside its namespaces. The namespaces of a run still in progress are left alone.

Needs root and iproute2 (`ip netns`); `unavailable()` says why hosts cannot be made here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

PREFIX = "dfh"
"""Every namespace and link this harness makes starts with this, then the owner's pid."""
_OWNED = re.compile(rf"^{PREFIX}(\d+)[bvp-]")
SUBNET = "10.213"
LOCK = Path("/tmp/datumflow-hosts.lock")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def unavailable() -> str:
    """Why network namespaces cannot be made here ("" if they can)."""
    if not shutil.which("ip"):
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return ""


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links() -> list[str]:
    out = _ip("-o", "link", "show", check=False).stdout
    # "12: dfh123v1@if11: <...>" -> dfh123v1
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _kill_inside(namespace: str) -> None:
    """SIGKILL every process left in `namespace` (all started there by a run of this harness)."""
    out = _ip("netns", "pids", namespace, check=False).stdout
    for pid in out.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _remove(namespaces: Sequence[str], links: Sequence[str]) -> None:
    for namespace in namespaces:
        _kill_inside(namespace)
        _ip("netns", "del", namespace, check=False)
    for link in links:
        _ip("link", "del", link, check=False)


def sweep() -> list[str]:
    """Remove the namespaces and links of earlier runs whose process is gone; what was removed."""
    dead = [
        name
        for name in [*_namespaces(), *_links()]
        if (m := _OWNED.match(name)) and not _alive(int(m.group(1)))
    ]
    _remove([n for n in dead if "-" in n], [n for n in dead if "-" not in n])
    return dead


def _free_subnet() -> int:
    """A third octet N such that no address of this machine is in 10.213.N.0/24."""
    used = set(re.findall(rf"inet {re.escape(SUBNET)}\.(\d+)\.", _ip("-4", "-o", "addr").stdout))
    for n in range(1, 255):
        if str(n) not in used:
            return n
    raise RuntimeError(f"every {SUBNET}.N.0/24 is in use on this machine")


class Host:
    """One namespace with one address. Processes started with `run` are stopped at teardown."""

    def __init__(self, *, name: str, namespace: str, address: str, link: str) -> None:
        self.name = name
        self.namespace = namespace
        self.address = address
        self.link = link
        """Our end of the host's veth pair, on the bridge: down cuts the host off the network."""
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def launcher(self) -> list[str]:
        """Prefix of a command line that runs it on this host."""
        return ["ip", "netns", "exec", self.namespace]

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, log: Path
    ) -> subprocess.Popen[bytes]:
        out: IO[bytes]
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [*self.launcher, *argv],
                env=dict(env) if env is not None else None,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def cut(self) -> None:
        """Unplug the host: nothing reaches it or leaves it until `heal`."""
        _ip("link", "set", self.link, "down")

    def heal(self) -> None:
        _ip("link", "set", self.link, "up")

    def kill_all(self) -> None:
        """SIGKILL everything running on the host, as when it loses power."""
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        _kill_inside(self.namespace)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        self.processes.clear()


class Hosts:
    """Hosts on one bridge, made on entry and removed on exit, whatever happened between."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.owner = os.getpid()
        self.bridge = f"{PREFIX}{self.owner}b"
        self.hosts: dict[str, Host] = {}
        self.gateway = ""

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Hosts:
        try:
            self._make()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _make(self) -> None:
        # One run at a time picks its subnet and makes its links: two runs must not pick the same.
        with open(LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            sweep()
            subnet = f"{SUBNET}.{_free_subnet()}"
            self.gateway = f"{subnet}.254"
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        for index, name in enumerate(self.names, start=1):
            namespace = f"{PREFIX}{self.owner}-{name}"
            ours, theirs = f"{PREFIX}{self.owner}v{index}", f"{PREFIX}{self.owner}p{index}"
            host = Host(name=name, namespace=namespace, address=f"{subnet}.{index}", link=ours)
            self.hosts[name] = host
            _ip("netns", "add", namespace)
            _ip("link", "add", ours, "type", "veth", "peer", "name", theirs)
            _ip("link", "set", theirs, "netns", namespace)
            inside = ["-n", namespace]
            _ip(*inside, "link", "set", theirs, "name", "eth0")
            _ip(*inside, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip(*inside, "link", "set", "eth0", "up")
            _ip(*inside, "link", "set", "lo", "up")
            _ip("link", "set", ours, "master", self.bridge, "up")

    def teardown(self) -> None:
        for host in self.hosts.values():
            host.kill_all()
        namespaces = [f"{PREFIX}{self.owner}-{name}" for name in self.names]
        links = [f"{PREFIX}{self.owner}v{i}" for i in range(1, len(self.names) + 1)]
        _remove(namespaces, [*links, self.bridge])

    def leftovers(self) -> list[str]:
        """Namespaces and links of this run still on the machine (none after teardown)."""
        mine = re.compile(rf"^{PREFIX}{self.owner}[bvp-]")
        return [n for n in [*_namespaces(), *_links()] if mine.match(n)]


@contextlib.contextmanager
def hosts(names: Sequence[str]) -> Iterator[Hosts]:
    with Hosts(names) as made:
        yield made
