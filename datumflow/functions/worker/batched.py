"""`transform.datum_batching`: the user code started once per worker, asking for each datum.

The code runs in the sandbox like any command (its own mount namespace with /pfs bound to this
worker's batch layout, the user it is switched to, an environment without credentials) and loops
on `next datum`: a call reports the datum in hand done, or failed, and waits until the worker has
laid out the next one. From Python (datumflow.batching) a call is a round trip on a Unix socket
of this worker's; from a shell, `datumflow-next-datum` is a `#!/bin/sh` client the worker puts
first on the code's PATH, a line each way through a pair of named pipes (batch_fifo).

- The socket, the pipes and the sh client are in a directory of its own under the temporary
  directory (mode 0700, owned by the user the code runs as): reachable from the code's
  namespace, which changes only /pfs, and by no other user. The socket's path is in
  `$DF_BATCH_SOCKET`.
- The layout directory stays the same from datum to datum (it is what the code's /pfs is bound
  to): it is emptied and filled in place, never replaced.
- A datum ends with the code's next call (success, or failure with its `--error`), with the code's
  exit (0: success, else failure), or at `datum_timeout` (the code's process tree is killed).
  After an exit or a kill the code is started again for the next datum.
- The code's output goes to the datum in hand, when it arrives; output between datums goes to
  the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from datumflow.batching import SOCKET_VAR
from datumflow.broker import subjects
from datumflow.broker.messages import DatumResult, DatumStats, DatumTask
from datumflow.broker.records import PipelineInfo
from datumflow.errors import PermanentError
from datumflow.functions.worker import sandbox
from datumflow.functions.worker.attempt import MakeResult, Retry, upload
from datumflow.functions.worker.batch_session import Call, Exited, Session
from datumflow.functions.worker.commands import Commands
from datumflow.functions.worker.proctree import alive
from datumflow.spec import parse_duration

log = logging.getLogger(__name__)

PREFIX = "datumflow-batch-"
"""Socket directories are `<tmp>/datumflow-batch-<worker pid>-<random>`."""


class Batched:
    """The datums of a datum-batching pipeline, handed one by one to its running user code."""

    def __init__(self, *, commands: Commands, grace: float = 5.0) -> None:
        self.commands = commands
        self.grace = grace
        self._session: Session | None = None

    async def run(
        self, task: DatumTask, info: PipelineInfo, attempt: int, make: MakeResult
    ) -> DatumResult:
        """Hand `task` to the running code (started first if need be) and wait for it to say
        it is done; raises Retry when the attempt failed and tries remain."""
        spec = info.spec
        timeout = parse_duration(spec.datum_timeout, field="datum_timeout")
        stats = DatumStats()
        session = await self._session_for(info)
        try:
            if session.waiting is None:
                # A code just started: its first call, within the datum's time limit too.
                event = await session.next_event(timeout)
                if not isinstance(event, tuple):
                    return await self._failed(
                        task, info, attempt, make, stats, session, event, asked=False
                    )
                session.waiting = event[1]
            layout = session.layout
            t0 = time.monotonic()
            await asyncio.to_thread(_empty, layout)
            try:
                stats.download_bytes = await self.commands.download(task, layout)
            except PermanentError as exc:
                return make("failed", error=f"downloading the datum's inputs: {exc}", stats=stats)
            stats.download_time = time.monotonic() - t0
            if self.commands.run_as is not None:
                os.chown(layout / "out", *self.commands.run_as)
            session.live = subjects.logs(task.pipeline, task.job, task.datum)
            t1 = time.monotonic()
            while not await session.answer(self._datum_env(task)):
                # Its caller was gone (killed after asking): the datum goes to the next call,
                # whose report is of no datum, rather than pass unrun on that report.
                event = await session.next_event(timeout)
                if not isinstance(event, tuple):
                    return await self._failed(
                        task, info, attempt, make, stats, session, event, asked=True
                    )
                session.waiting = event[1]
            event = await session.next_event(timeout)
            stats.process_time = time.monotonic() - t1
            if isinstance(event, tuple) and not event[0]:
                session.waiting = event[1]
                logs = await self._store_log(session)
                return await upload(self.commands.store, layout / "out", stats, make, logs=logs)
            if isinstance(event, Exited) and (
                event.outcome.returncode == 0
                or event.outcome.returncode in spec.transform.accept_return_code
            ):
                self._session = None
                logs = await self._store_log(session)
                await session.end(grace=0)
                return await upload(self.commands.store, layout / "out", stats, make, logs=logs)
            return await self._failed(task, info, attempt, make, stats, session, event, asked=True)
        except Retry:
            raise
        except BaseException:
            # Cancelled (the worker is stopping) or broken: the code may be in the middle of the
            # datum, which goes back to the stream; it must not go on writing into the layout.
            if self._session is session and session.live:
                self._session = None
                session.kill.set()
                await session.end(grace=0)
            raise
        finally:
            session.live = ""

    async def _failed(
        self,
        task: DatumTask,
        info: PipelineInfo,
        attempt: int,
        make: MakeResult,
        stats: DatumStats,
        session: Session,
        event: Call | Exited | None,
        *,
        asked: bool,
    ) -> DatumResult:
        spec = info.spec
        if isinstance(event, tuple):
            session.waiting = event[1]  # the code lives on, and waits for the next datum
            error = f"the user code reported the datum failed: {event[0]}"
        else:
            # Exited or timed out: the code is started again for the next datum.
            self._session = None
            if event is None:
                session.kill.set()
            outcome = await session.end(grace=0)
            if event is None:
                error = (
                    f"the datum ran longer than datum_timeout ({spec.datum_timeout}) and was killed"
                )
            else:
                code = outcome.returncode if outcome is not None else None
                error = f"the user code exited with code {code}"
                if not asked:
                    error += " before asking for a datum with next datum"
        data = bytes(session.log)
        logs = await self._store_log(session)
        tail = data[-400:].decode(errors="replace").strip()
        if tail and not isinstance(event, tuple):
            error += f": {tail}"
        if spec.transform.err_cmd and asked:
            recovered = await self.commands.user_code(
                task, info, session.layout, spec.transform.err_cmd, spec.transform.err_stdin
            )
            if recovered.returncode == 0:
                return make("recovered", error=error, logs=logs, stats=stats)
        if attempt < spec.datum_tries:
            raise Retry(error)
        return make("failed", error=error, logs=logs, stats=stats)

    async def _store_log(self, session: Session) -> str:
        data = session.take_log()
        if not data:
            return ""
        key, _ = await self.commands.store.put_bytes(data)
        return key

    def _datum_env(self, task: DatumTask) -> dict[str, str]:
        root = self._root(self._session.layout if self._session else Path("/pfs"))
        env = {inp.name: f"{root}/{inp.name}{inp.root.rstrip('/') or ''}" for inp in task.inputs}
        env.update(PACH_JOB_ID=task.job, PACH_DATUM_ID=task.datum)
        return env

    def _root(self, layout: Path) -> str:
        return "/pfs" if self.commands.mode in ("namespace", "direct") else str(layout)

    async def _session_for(self, info: PipelineInfo) -> Session:
        """The running code of this spec's transform, started if there is none (or it was
        started for another transform: an updated pipeline)."""
        transform = info.spec.transform
        session = self._session
        # A code that exited between datums (its loop ended without a call of ours to end it)
        # cannot take this one: its waiting call is dead, and its exit says nothing of it.
        running = session is not None and session.process is not None and not session.process.done()
        if session is not None and running and session.transform == transform:
            return session
        await self.close()
        session = await self._start(info)
        self._session = session
        return session

    async def _start(self, info: PipelineInfo) -> Session:
        spec = info.spec
        commands = self.commands
        if commands.mode == "direct":
            layout = Path("/pfs")
        else:
            layout = commands.scratch / "batch" / "pfs"
        layout.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_empty, layout)
        (layout / "out").mkdir(exist_ok=True)
        # Short (a socket path holds at most 107 bytes) and reachable from the code's namespace.
        await asyncio.to_thread(_remove_stale, Path(tempfile.gettempdir()))
        sockets = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        session = Session(transform=spec.transform, layout=layout, sockets=sockets)
        session.server = await asyncio.start_unix_server(session.call, path=str(session.socket))
        if commands.run_as is not None:
            os.chown(sockets, *commands.run_as)
            os.chown(session.socket, *commands.run_as)
            os.chown(layout / "out", *commands.run_as)
        session.serve_pipes(commands.run_as)
        root = self._root(layout)
        extra = dict(spec.transform.env)
        extra.update(
            PFS=root,
            PACH_PIPELINE_NAME=spec.pipeline.name,
            PACH_OUTPUT_DIR=f"{root}/out",
        )
        extra[SOCKET_VAR] = str(session.socket)
        env = sandbox.user_environment(extra)
        # The sh client first on the PATH: `datumflow-next-datum` costs no interpreter start.
        env["PATH"] = f"{session.pipes.bin}:{env.get('PATH') or '/usr/bin:/bin'}"
        stdin = spec.transform.stdin
        text = ("\n".join(stdin) + "\n").encode() if stdin else b""
        broker = commands.broker

        async def output(chunk: bytes) -> None:
            session.keep(chunk)
            if session.live:
                with contextlib.suppress(Exception):  # live lines only: lost if no one listens
                    await broker.publish_core(session.live, chunk)

        def exited(process: asyncio.Task[sandbox.Outcome]) -> None:
            if process.cancelled() or process.exception() is not None:
                outcome = sandbox.Outcome(returncode=None, log=b"", elapsed=0.0)
            else:
                outcome = process.result()
            session.events.put_nowait(Exited(outcome))

        session.process = asyncio.create_task(
            sandbox.run(
                spec.transform.cmd,
                stdin=text,
                env=env,
                layout=layout,
                mode=commands.mode,
                timeout=None,
                on_output=output,
                run_as=commands.run_as,
                kill=session.kill,
                keep_log=False,
            )
        )
        session.process.add_done_callback(exited)
        log.info("datum batching: started the user code of %s", spec.pipeline.name)
        return session

    async def close(self) -> None:
        """No more datums: the code is told so, and given the grace period to exit."""
        session, self._session = self._session, None
        if session is not None:
            await session.end(grace=self.grace)


def _empty(layout: Path) -> None:
    """Everything under the layout removed but `out` itself (emptied), which the code may have
    as its working directory; the layout stays, as the code's /pfs is bound to it."""
    for entry in os.scandir(layout):
        if entry.name == "out" and entry.is_dir(follow_symlinks=False):
            for child in os.scandir(entry.path):
                _remove(child)
            continue
        _remove(entry)


def _remove(entry: os.DirEntry[str]) -> None:
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)


def _remove_stale(tmp: Path) -> None:
    """Socket directories of workers that were killed (SIGKILL leaves them): nobody else does."""
    for path in tmp.glob(f"{PREFIX}*-*"):
        pid = path.name[len(PREFIX) :].split("-")[0]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
