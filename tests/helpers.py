"""What the tests share: waiting on a condition, `datumflow up` as a child process of the test, and
the few calls that put files, create pipelines and read jobs through it.

Fixtures live in conftest.py; everything a test module imports lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import msgspec
import nats
from nats.js import JetStreamContext

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.messages import DatumResult, DatumResults, DeadLetter, FileRef
from datumflow.broker.pull import Puller
from datumflow.broker.records import JobInfo
from datumflow.broker.settle import Msg
from datumflow.broker.streams import read_subjects
from datumflow.broker.topology import ensure_pipeline_consumers
from datumflow.cli.context import Api, open_api
from datumflow.pfs import manifest
from datumflow.runtime.embedded import EmbeddedServer, read_instance
from datumflow.settings import Settings
from datumflow.spec import load_spec

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = REPO_ROOT / "tests" / "data"
"""Files the tests read (reference payloads, schemas): in the repository, so a clone has them."""


# -- waiting on a condition ---------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[T] | T],
    *,
    until: Callable[[T], object] = bool,
    timeout: float = 30.0,
    interval: float = 0.1,
    what: str = "",
) -> T:
    """Call `check` (a plain function or a coroutine function) until `until` holds for what it
    returns (by default: until it is truthy), and return that; fail naming `what` and the last
    value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if until(last):  # type: ignore[arg-type]
            return last  # type: ignore[return-value]
        if cancel_requested():  # Ctrl-C (or a test's own timeout) lost inside `check`
            raise asyncio.CancelledError
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what or check}: last {last!r}"
            )
        await asyncio.sleep(interval)


def cancel_requested() -> bool:
    """The running task was cancelled, even if Python 3.11's asyncio.wait_for (under nats-py's calls)
    swallowed the CancelledError: it does when the awaited call is already done, as under load."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def wait_until(
    check: Callable[[], T],
    *,
    until: Callable[[T], object] = bool,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "",
) -> T:
    """`eventually` for code with no event loop (fixtures that start processes, sync tests)."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if until(last):
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what or check}: last {last!r}"
            )
        time.sleep(interval)


# -- processes ----------------------------------------------------------------------------------


def dead(pid: int) -> bool:
    """Gone, or a zombie no one has reaped yet (this machine's init may not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


HOST_PID = "read -r pid _ _ ppid _ < /proc/self/stat"
"""Shell that sets `$pid` and `$ppid` to the shell's pid and its parent's as this machine (and the
test) sees them: user code runs in a PID namespace of its worker's, where `$$`, `$!` and `$PPID`
are that namespace's (and its parent, the worker, is outside it: `$PPID` is 0)."""


def reporting_pid(to: str, command: str) -> str:
    """A shell command that writes its machine-wide pid to the file `to`, then becomes `command`."""
    return f"sh -c '{HOST_PID}; echo $pid > {to}; exec {command}'"


def marks_of(marks: Path) -> list[str]:
    """Names of the mark files user code left (`<input file>.<shell pid>`), one per attempt."""
    return sorted(p.name.rsplit(".", 1)[0] for p in marks.iterdir())


# -- `datumflow up` -----------------------------------------------------------------------------


class Cluster:
    """`datumflow up` as a child process, and the real CLI and API against it.

    With a `server`, `up` uses the test's nats-server and `settings` reach it; without one, `up`
    runs a broker of its own (named in its instance file) and the test sets `settings` itself if
    it wants `api()`.
    """

    def __init__(
        self,
        *,
        home: Path,
        env: dict[str, str],
        server: EmbeddedServer | None = None,
        up_args: tuple[str, ...] = (),
        home_flag: bool = True,
        cli_env: dict[str, str] | None = None,
    ) -> None:
        self.home = home
        self.server = server
        self.env = env
        self.up_args = up_args
        self.cli_env = cli_env
        """The CLI's environment when it differs from `up`'s (secrets only `up` is given)."""
        # Without --home the commands find the state directory from DATUMFLOW_HOME alone.
        self.prefix = [sys.executable, "-m", "datumflow.cli.main"]
        if home_flag:
            self.prefix += ["--home", str(home)]
        self.process: subprocess.Popen[bytes] | None = None
        self.settings: Settings | None = None
        if server is not None:
            self.settings = Settings(
                home=str(home),
                nats_url=server.url,
                monitor_url=server.monitor,
                storage=(home / "objects").as_uri(),
                ack_wait=float(env.get("DATUMFLOW_ACK_WAIT", "30")),
            )

    def start(self, *, timeout: float = 60) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "up.log", "ab") as log:
            self.process = subprocess.Popen(
                [*self.prefix, "up", *self.up_args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        process = self.process

        def started() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"datumflow up exited {process.returncode}: {self.log('up')}")
            instance = read_instance(self.home)
            return instance is not None and instance.pid == process.pid

        wait_until(started, timeout=timeout, what="datumflow up to write its instance file")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self, name: str) -> str:
        path = self.home / ("up.log" if name == "up" else f"logs/{name}.log")
        try:
            return path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return f"(no {path})"

    def cli(
        self, *args: str, input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the real `datumflow` command against this cluster."""
        result = subprocess.run(
            [*self.prefix, *args],
            env=self.env if self.cli_env is None else self.cli_env,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"datumflow {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    @contextlib.asynccontextmanager
    async def api(self) -> AsyncIterator[Api]:
        assert self.settings is not None, "this cluster's broker is up's own: set settings first"
        async with open_api(self.settings) as api:
            yield api

    def worker_pids(self, pipeline: str) -> list[int]:
        """Worker processes of `pipeline` started by this cluster's supervisor."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            if (
                b"worker" in argv
                and pipeline.encode() in argv
                and str(self.home).encode() in environ
            ):
                pids.append(int(proc.name))
        return pids


def cluster_env(home: Path, server: EmbeddedServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
    env.update(
        DATUMFLOW_HOME=str(home),
        DATUMFLOW_NATS_URL=server.url,
        DATUMFLOW_MONITOR_URL=server.monitor,
        DATUMFLOW_STORAGE=(home / "objects").as_uri(),
        DATUMFLOW_ACK_WAIT="3",
        DATUMFLOW_GRACE="5",
        # No web console but where a test asks for one (tests/test_console*.py): a process less
        # for every `up` of the suite.
        DATUMFLOW_CONSOLE_ADDRESS="off",
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def shared_cluster(root: Path, **extra: str) -> Iterator[Cluster]:
    """One nats-server and one `datumflow up` for a whole module, where each test uses its own
    repo and pipeline: starting them costs more than most tests."""
    server = EmbeddedServer(store_dir=root / "nats", log_file=root / "nats-server.log")
    server.start()
    asyncio.run(server.wait_ready())
    home = root / "home"
    shared = Cluster(home=home, server=server, env=cluster_env(home, server, **extra))
    try:
        shared.start()
        yield shared
    finally:
        shared.stop()
        server.stop()


# -- repos, pipelines and jobs through a cluster ------------------------------------------------


def spec_json(**fields: object) -> bytes:
    return msgspec.json.encode(fields)


async def commit(
    cluster: Cluster,
    repo: str,
    puts: dict[str, bytes],
    deletes: Iterable[str] = (),
    *,
    create: bool = False,
) -> str:
    """Store the files and commit them (and the deletions) to repo@master; the commit's id."""
    async with cluster.api() as api:
        if create:
            await api.repos.create_repo(repo)
        refs = []
        for path, data in sorted(puts.items()):
            key, size = await api.store.put_bytes(data)
            refs.append(FileRef(path=path, size=size, hash=key))
        info = await api.repos.commit_files(repo, "master", puts=refs, deletes=list(deletes))
        return info.id


async def put_files(
    cluster: Cluster, repo: str, files: dict[str, bytes], *, create: bool = True
) -> str:
    """A new repo (unless create=False) with the files in its first commit; the commit's id."""
    return await commit(cluster, repo, files, create=create)


async def output_files(cluster: Cluster, repo: str) -> dict[str, bytes]:
    """The head of repo@master, path → content ({} before the first commit)."""
    async with cluster.api() as api:
        head = await api.repos.head(repo, "master")
        if head is None:
            return {}
        return {
            f.path: await api.store.get_bytes(f.hash)
            for f in await manifest.read(api.store, head.manifest)
        }


def create_pipeline(cluster: Cluster, tmp_path: Path, spec: dict, *, update: bool = False) -> None:
    """`datumflow create pipeline -f` (or `update pipeline`) with the spec written to a file."""
    path = tmp_path / f"{spec['pipeline']['name']}.json"
    path.write_text(json.dumps(spec))
    cluster.cli("update" if update else "create", "pipeline", "-f", str(path))


async def jobs_of(cluster: Cluster, pipeline: str) -> list[JobInfo]:
    """The pipeline's jobs, newest first."""
    async with cluster.api() as api:
        return await api.pipelines.list_jobs(pipeline)


async def wait_job_done(
    cluster: Cluster, pipeline: str, *, count: int = 1, timeout: float = 60
) -> list[JobInfo]:
    """Once at least `count` jobs of the pipeline are done: the done ones, newest first."""
    async with cluster.api() as api:  # one connection for the whole wait: the machine is busy

        async def done() -> list[JobInfo] | None:
            finished = [j for j in await api.pipelines.list_jobs(pipeline) if j.done]
            return finished if len(finished) >= count else None

        try:
            return await eventually(
                done, timeout=timeout, interval=0.25, what=f"{count} finished job(s) of {pipeline}"
            )
        except AssertionError:
            print(
                cluster.log("planner"),
                cluster.log("committer"),
                cluster.log(f"worker-{pipeline}-0"),
            )
            raise


async def results_of(cluster: Cluster, pipeline: str, job: str = "") -> list[DatumResult]:
    """Every datum result of the pipeline (of one job, if named) in the results stream, in stream
    order; results sent together in one message come one by one.

    Read as `list datum` reads them (broker.streams.read_subjects: a pull consumer that
    acknowledges nothing, asked how many wait before the first fetch). A push consumer would not
    do: the server may deliver every message before its count is asked for, which then says 0."""
    out: list[DatumResult] = []
    async with cluster.api() as api:
        batches = read_subjects(
            api.broker,
            stream=subjects.RESULTS_STREAM,
            filters=[f"df.result.{pipeline}.>"],
            what=f"reading the results of {pipeline}",
        )
        async with contextlib.aclosing(batches):
            async for msgs in batches:
                for msg in msgs:
                    if subjects.is_results(msg.subject):
                        out += msgspec.json.decode(msg.data, type=DatumResults).results
                    else:
                        out.append(msgspec.json.decode(msg.data, type=DatumResult))
    return [r for r in out if not job or r.job == job]


async def datums_in_hand(broker: Broker, pipeline: str, count: int) -> tuple[Puller, list[Msg]]:
    """`count` datum messages (empty tasks) queued for a command pipeline `pipeline` and fetched
    from its worker consumer, as a worker holds them; close the puller when done."""
    spec = load_spec(
        json.dumps(
            {
                "pipeline": {"name": pipeline},
                "input": {"pfs": {"repo": "in", "glob": "/*"}},
                "transform": {"cmd": ["true"]},
            }
        )
    )
    await ensure_pipeline_consumers(broker, spec, ack_wait=30)
    for i in range(count):
        await broker.js.publish(subjects.datum(pipeline), b"{}", headers={"Nats-Msg-Id": f"t{i}"})
    puller = Puller(
        broker, stream=subjects.DATUMS_STREAM, durable=subjects.worker_consumer(pipeline)
    )
    msgs = await puller.fetch(batch=count, wait=5)
    assert len(msgs) == count
    return puller, msgs


async def dead_letters_now(broker: Broker, function: str) -> list[DeadLetter]:
    """The dead letters of `function` in the dead-letter stream now, oldest first (read as
    `list datum` reads results: without waiting for more)."""
    out: list[DeadLetter] = []
    async for msgs in read_subjects(
        broker, stream=subjects.DEAD_STREAM, filters=[subjects.dead(function)], what="test"
    ):
        out += [msgspec.json.decode(m.data, type=DeadLetter) for m in msgs]
    return out


async def dead_letters(
    url: str, function: str, count: int, *, timeout: float = 20
) -> list[DeadLetter]:
    """The first `count` dead letters of a function in the dead-letter stream, waiting at most
    `timeout` for each."""
    nc = await nats.connect(url)
    sub = None
    try:
        sub = await nc.jetstream().subscribe(subjects.dead(function), ordered_consumer=True)
        return [
            msgspec.json.decode((await sub.next_msg(timeout=timeout)).data, type=DeadLetter)
            for _ in range(count)
        ]
    finally:
        await _close(nc, sub)


async def _close(nc: nats.NATS, sub: JetStreamContext.PushSubscription | None) -> None:
    # Unsubscribe first: an ordered consumer's heartbeat check would outlive the connection by up
    # to two heartbeat intervals.
    if sub is not None:
        await sub.unsubscribe()
    await nc.close()
