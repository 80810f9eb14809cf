"""Datums through an in-process function (`transform.function`), called on the user-code thread
(functions.worker.userthread) with its /pfs layout (functions.worker.layout).

A datum set whose inputs are all in the local store goes to the thread in one go (`each`); any
other datum is laid out, downloaded by the loop, then called (`one`). Both end in `_called`: the
outcome of the call as a result, Retry, or an err_cmd run in the layout the datum left.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

from datumflow.broker.messages import DatumResult, DatumStats, DatumTask
from datumflow.broker.records import PipelineInfo
from datumflow.errors import PermanentError
from datumflow.functions.worker import inprocess
from datumflow.functions.worker.attempt import MakeResult, Retry, result_maker, upload
from datumflow.functions.worker.commands import Commands
from datumflow.functions.worker.layout import Layouts
from datumflow.functions.worker.userthread import DatumTimeout, Run, UserThread
from datumflow.spec import parse_duration
from datumflow.storage.base import ObjectStore
from datumflow.storage.file import FileStore

log = logging.getLogger(__name__)


class Functions:
    def __init__(self, *, store: ObjectStore, commands: Commands, scratch: Path) -> None:
        self.store = store
        self.commands = commands
        """For downloads and err_cmd."""
        self.scratch = scratch
        self.thread = UserThread()
        self._functions: dict[str, inprocess.UserFunction | inprocess.FunctionError] = {}
        self._layouts: Layouts | None = None
        self._run: Run | None = None

    def halt(self) -> None:
        """Stopping: start no other datum of the set in hand after the one running."""
        if self._run is not None:
            self._run.halt()

    async def close(self) -> None:
        self.thread.close()
        if self._layouts is not None:
            await asyncio.to_thread(self._layouts.close)

    def layouts(self) -> Layouts:
        if self._layouts is None:
            self._layouts = Layouts(scratch=self.scratch, direct=self.commands.mode == "direct")
        return self._layouts

    def resolve(self, ref: str) -> inprocess.UserFunction:
        """The function `ref` names, imported once; a FunctionError (logged once) if none."""
        found = self._functions.get(ref)
        if found is None:
            try:
                found = inprocess.resolve(ref)
            except inprocess.FunctionError as exc:
                log.error("%s", exc)
                found = exc
            self._functions[ref] = found
        if isinstance(found, inprocess.FunctionError):
            raise found
        return found

    async def each(
        self,
        tasks: list[tuple[DatumTask, int]],
        info: PipelineInfo,
        number: int,
        *,
        on_last: Callable[[], None] | None = None,
    ) -> AsyncGenerator[tuple[int, DatumResult | Retry], None]:
        """A datum set (each task with its attempt number) on the user-code thread: yields each
        datum's index and result (or Retry) as it finishes, while the thread goes on with the
        next one. Every input must be in the local store (`local_objects`). `on_last` is called
        when the thread starts the set's last datum."""
        spec = info.spec
        try:
            function = self.resolve(spec.transform.function)
        except inprocess.FunctionError as exc:
            for index, (task, attempt) in enumerate(tasks):
                yield index, result_maker(task, attempt)("failed", error=str(exc))
            return
        store = self.store
        assert isinstance(store, FileStore)
        layouts = self.layouts()
        env = dict(spec.transform.env)
        jobs = [
            functools.partial(
                inprocess.run_datum,
                function=function,
                task=task,
                layouts=layouts,
                objects=store.file,
                attempt=attempt,
                batch=number,
                env=env,
            )
            for task, attempt in tasks
        ]
        timeout = parse_duration(spec.datum_timeout, field="datum_timeout")
        self._run = self.thread.each(jobs, timeout=timeout, on_last=on_last)
        try:
            # Closed on the way out, whatever happens: the thread stops with the set.
            async with contextlib.aclosing(aiter(self._run)) as results:
                async for index, outcome in results:
                    task, attempt = tasks[index]
                    make = result_maker(task, attempt)
                    try:
                        yield index, await self._called(info, task, outcome, make, attempt)
                    except Retry as exc:
                        yield index, exc
        finally:
            self._run = None

    async def one(
        self, task: DatumTask, info: PipelineInfo, attempt: int, number: int, make: MakeResult
    ) -> DatumResult:
        """One datum through an in-process function, whatever the store; the layout stays as
        the datum left it until its result is made (err_cmd runs in it). Raises Retry when the
        attempt failed and tries remain."""
        spec = info.spec
        try:
            function = self.resolve(spec.transform.function)
        except inprocess.FunctionError as exc:
            return make("failed", error=str(exc))
        layouts = self.layouts()
        local = local_objects(self.store, task)
        prepared = None
        download = DatumStats()
        if local is None:
            # Remote objects: lay out on this thread's layout, download with the store's async
            # client, then call.
            t0 = time.monotonic()
            prepared = layouts.pick(self.thread.generation, input_bytes=0, local=False)
            await self.thread.run(lambda _: layouts.prepare(prepared, task, None))
            try:
                download.download_bytes = await self.commands.download(task, prepared.root)
            except PermanentError as exc:
                return make("failed", error=f"downloading the datum's inputs: {exc}")
            download.download_time = time.monotonic() - t0
        job = functools.partial(
            inprocess.run_datum,
            function=function,
            task=task,
            layouts=layouts,
            objects=local,
            attempt=attempt,
            batch=number,
            env=dict(spec.transform.env),
            prepared=prepared,
        )
        timeout = parse_duration(spec.datum_timeout, field="datum_timeout")
        async with contextlib.aclosing(aiter(self.thread.each([job], timeout=timeout))) as results:
            async for _, outcome in results:
                if isinstance(outcome, inprocess.Called) and prepared is not None:
                    outcome.download_time = download.download_time
                    outcome.download_bytes = download.download_bytes
                return await self._called(info, task, outcome, make, attempt)
        raise Retry("stopped before the datum ran")

    async def _called(
        self, info: PipelineInfo, task: DatumTask, outcome: Any, make: MakeResult, attempt: int
    ) -> DatumResult:
        """The result of one call of an in-process function (or why it did not happen)."""
        spec = info.spec
        if isinstance(outcome, DatumTimeout):
            timeout = parse_duration(spec.datum_timeout, field="datum_timeout") or 0.0
            outcome = inprocess.Called(
                error=f"the datum ran longer than datum_timeout ({spec.datum_timeout}) and was"
                " stopped",
                elapsed=timeout,
            )
        elif isinstance(outcome, FileNotFoundError) and outcome.filename:
            return make("failed", error=f"an input is missing from the store: {outcome.filename}")
        elif isinstance(outcome, BaseException):
            # Laying out the datum failed (a full disk, say): an attempt that may pass.
            outcome = inprocess.Called(error=f"laying out the datum: {outcome}", elapsed=0.0)
        assert isinstance(outcome, inprocess.Called)
        stats = DatumStats(
            download_time=outcome.download_time,
            download_bytes=outcome.download_bytes,
            process_time=outcome.elapsed,
        )
        if outcome.error:
            logs = (await self.store.put_bytes(outcome.log))[0] if outcome.log else ""
            if spec.transform.err_cmd and outcome.root is not None:
                # The layout is as the datum left it: only one datum at a time runs with err_cmd.
                recovered = await self.commands.user_code(
                    task, info, outcome.root, spec.transform.err_cmd, spec.transform.err_stdin
                )
                if recovered.returncode == 0:
                    return make("recovered", error=outcome.error, logs=logs, stats=stats)
            if attempt < spec.datum_tries:
                raise Retry(outcome.error)
            return make("failed", error=outcome.error, logs=logs, stats=stats)
        if outcome.outputs is None:
            return make("success", stats=stats)
        try:
            return await upload(self.store, outcome.outputs, stats, make)
        finally:
            await asyncio.to_thread(shutil.rmtree, outcome.outputs, True)


def local_objects(store: ObjectStore, task: DatumTask) -> Callable[[str], Path] | None:
    """Where a local store keeps an object, so the user-code thread can copy inputs itself;
    None when any input must be downloaded (another store, or a file referenced in a bucket)."""
    if not isinstance(store, FileStore):
        return None
    if any(f.source is not None for i in task.inputs for f in i.files):
        return None
    return store.path
