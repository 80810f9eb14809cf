"""The ingest function: bucket notifications → commits to the repos those buckets feed.

Notifications (MinIO's or AWS S3's, see datumflow.pfs.notifications) wait in the DF_INGEST stream
(datumflow.broker.ingest_stream). Ingest takes what arrives within a short window after the first
one, maps each object onto its repo, branch and path (datumflow.pfs.bucket_sources), and makes one
commit per branch for the whole batch: a burst of a thousand uploads is one commit, not a thousand.
Objects are referenced in place (`FileRef.source`: bucket, key, ETag, version), never copied; the
worker checks the ETag when it reads one.

Invariants:

- No notification is acked before the commit carrying its change is recorded and announced. A
  batch that fails half-way is nak'ed whole and comes back.
- Idempotent: a change is compared with the branch head before it is committed, so a redelivered
  batch, or a repeated event for an object version already in the head (same ETag and version),
  changes nothing. Within a batch, and against a memory of recent ones, an event whose sequencer is
  not newer than one already applied for that key is dropped. The commit id is derived from the
  parent and the changes, so a retry after a crash between recording and moving the branch finishes
  that same commit.
- A notification that is not one (bad JSON, no Records) goes to `df.dead.ingest` with the reason
  and is terminated; a record that cannot be a repo file (a key with a `..` segment, a file where
  the repo has a directory) is dead-lettered with its message while the message's other records
  are committed.

Replicas run active/standby (datumflow.runtime.leader): two ingests sharing the stream would each
take part of a burst, so a key's older version could be committed after its newer one by the
other replica, and the memory of applied sequencers is per process. The active replica checks its
lease before each commit, made only on the head it was built on.

Order: notifications of one key are applied in stream order unless their sequencers say otherwise;
across a restart, only the comparison with the head protects against a stale redelivered event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict

import msgspec

from datumflow.broker.connection import Broker
from datumflow.broker.consumer import MAX_MESSAGE, Subscription
from datumflow.broker.ingest_stream import Binding, ensure_ingest_stream
from datumflow.broker.lease import Lease
from datumflow.broker.messages import FileRef, ObjectSource
from datumflow.broker.settle import UNEXPECTED_DELAY, Msg, dead_letter, keep_alive, settle
from datumflow.errors import BranchMoved, BrokerError, PermanentError, Superseded, TemporaryError
from datumflow.functions.ingest_changes import (
    Batch,
    commit_id,
    drop_conflicts,
    newer,
    object_url,
    sequencer_key,
)
from datumflow.pfs.bucket_sources import BucketSources
from datumflow.pfs.notifications import BucketMapping, ObjectChange, map_change, parse_notification
from datumflow.pfs.paths import clean_path
from datumflow.pfs.repos import Repos
from datumflow.storage.base import ObjectStore

log = logging.getLogger(__name__)

FUNCTION = "ingest"
HEARTBEAT = 10.0
REMEMBERED_KEYS = 100_000


class IngestOptions(msgspec.Struct, frozen=True, kw_only=True):
    window: float = 1.0
    """Seconds to gather notifications after the first one of a batch; one commit per branch."""
    max_batch: int = 5_000
    """Notifications in one batch at most (a bigger burst becomes several commits)."""
    subjects: tuple[str, ...] = ()
    """Subjects to capture besides `df.ingest.>` and those the mappings name."""
    refresh: float = 5.0
    """Seconds between re-reads of the bucket mappings."""
    max_retry_delay: float = 30.0
    """A batch that failed comes back after the delay its error asks for, at most this."""


class Ingest:
    def __init__(
        self,
        *,
        broker: Broker,
        store: ObjectStore,
        options: IngestOptions | None = None,
        lease: Lease | None = None,
    ) -> None:
        self.broker = broker
        self.lease = lease
        self.store = store
        self.options = options or IngestOptions()
        self.repos = Repos(broker=broker, store=store)
        self.sources = BucketSources(broker=broker)
        self.mappings: list[BucketMapping] = []
        self.subs: dict[Binding, Subscription] = {}
        self._subjects: frozenset[str] | None = None
        self._refreshed = 0.0
        # (bucket, key) → the sequencer of the newest change applied: drops stale and repeated
        # events without a round trip. Bounded; the head comparison backs it up.
        self._applied: OrderedDict[tuple[str, str], str] = OrderedDict()

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        if getattr(self.store, "head_source", None) is None:
            log.warning(
                "ingest: the object store %s is not S3: files committed from bucket notifications"
                " are read in place by the workers, which need `--storage s3://...`",
                self.store.url,
            )
        try:
            while not stop.is_set():
                if time.monotonic() - self._refreshed >= self.options.refresh or not self.subs:
                    try:
                        await self.refresh()
                    except BrokerError as exc:
                        log.warning("ingest: reading the bucket mappings: %s", exc)
                        await _pause(stop, 1.0)
                        continue
                    except Exception:
                        # A stream or consumer the server refuses: say so, keep trying.
                        log.exception("ingest: declaring where notifications arrive failed")
                        await _pause(stop, 5.0)
                        continue
                msgs = await self._collect(stop)
                if msgs:
                    await self.handle(msgs)
        finally:
            for sub in self.subs.values():
                await sub.close()

    async def refresh(self) -> None:
        """Re-read the mappings; capture and consume any subject a new one names."""
        self.mappings = await self.sources.list()
        self._refreshed = time.monotonic()
        wanted = frozenset({m.subject for m in self.mappings if m.subject}) | frozenset(
            self.options.subjects
        )
        if wanted == self._subjects:
            return
        bindings = await ensure_ingest_stream(self.broker, wanted)
        for binding in [b for b in self.subs if b not in bindings]:
            await self.subs.pop(binding).close()
        for binding in bindings:
            if binding not in self.subs:
                self.subs[binding] = Subscription(
                    self.broker, stream=binding.stream, durable=binding.durable
                )
                log.info(
                    "ingest: reading %s from stream %s", ", ".join(binding.subjects), binding.stream
                )
        self._subjects = wanted

    async def _collect(self, stop: asyncio.Event) -> list[Msg]:
        """The messages of one batch: what arrives within `window` of the first one."""
        msgs: list[Msg] = []
        first = 0.0
        while not stop.is_set() and len(msgs) < self.options.max_batch:
            if msgs:
                wait = self.options.window - (time.monotonic() - first)
                if wait <= 0:
                    break
            else:
                wait = 1.0
            room = min(self.options.max_batch - len(msgs), 1_000)
            got = await self._fetch(room, max(wait, 0.05))
            if got and not msgs:
                first = time.monotonic()
            msgs += got
            if not msgs:
                break  # idle: let the caller look at the mappings and the stop flag
        return msgs

    async def _fetch(self, room: int, wait: float) -> list[Msg]:
        subs = list(self.subs.values())
        if len(subs) == 1:
            return await subs[0].fetch(batch=room, wait=wait)
        share = max(room // len(subs), 1)
        batches = await asyncio.gather(*(s.fetch(batch=share, wait=wait) for s in subs))
        return [msg for batch in batches for msg in batch]

    # -- one batch ---------------------------------------------------------------------------

    async def handle(self, msgs: list[Msg]) -> None:
        """Commit the changes of a batch of notifications, then settle every message."""
        beat = asyncio.create_task(_heartbeat(msgs))
        try:
            batch = await self._read(msgs)
            try:
                for (repo, branch), entries in (await self._group(batch)).items():
                    await self._commit_group(repo, branch, entries, batch)
                for msg in batch.msgs:
                    if reasons := batch.reasons(msg):
                        await self._dead(msg, "; ".join(reasons), keep=True)
            except Exception as exc:
                # Nothing of the batch is acked: all of it comes back after the delay. Never
                # dead-lettered whole, whatever the error: part of it may be committed already.
                if isinstance(exc, Superseded):
                    log.warning("ingest: %s; handing the batch back", exc)
                    again = TemporaryError(str(exc), delay=0.0)
                elif isinstance(exc, TemporaryError):
                    log.warning("ingest: %s; the batch will be redelivered", exc)
                    again = exc
                else:
                    log.error(
                        "ingest: unexpected error committing a batch; it will be redelivered",
                        exc_info=exc,
                    )
                    again = TemporaryError(str(exc), delay=UNEXPECTED_DELAY)
                await settle(
                    self.broker,
                    function=FUNCTION,
                    msgs=batch.msgs,
                    outcome=again,
                    max_delay=self.options.max_retry_delay,
                )
                return
        finally:
            beat.cancel()
        await settle(self.broker, function=FUNCTION, msgs=batch.msgs)

    async def _read(self, msgs: list[Msg]) -> Batch:
        """Decode each message; the unusable ones are dead-lettered and terminated now."""
        batch = Batch()
        for msg in msgs:
            try:
                if len(msg.data) > MAX_MESSAGE:
                    raise PermanentError(
                        f"bucket notification of {len(msg.data)} bytes is over the"
                        f" {MAX_MESSAGE} byte limit"
                    )
                changes = parse_notification(msg.data)
            except PermanentError as exc:
                await self._dead(msg, str(exc), keep=False)
                continue
            batch.msgs.append(msg)
            batch.changes += [(msg, change) for change in changes]
        return batch

    async def _dead(self, msg: Msg, reason: str, *, keep: bool) -> None:
        """Dead-letter a message; unless `keep` (part of it was committed), terminate it.

        With `keep`, a failure to publish the letter propagates: the batch is then retried whole
        rather than acked without its letter."""
        if keep:
            await dead_letter(self.broker, function=FUNCTION, msg=msg, reason=reason)
            return
        await settle(self.broker, function=FUNCTION, msgs=msg, outcome=PermanentError(reason))

    async def _group(
        self, batch: Batch
    ) -> dict[tuple[str, str], dict[str, tuple[ObjectChange, Msg]]]:
        """The newest change of each path, per repo and branch."""
        groups: dict[tuple[str, str], dict[str, tuple[ObjectChange, Msg]]] = {}
        refreshed = False
        for msg, change in batch.changes:
            if self._seen(change):
                continue
            try:
                where = map_change(change, self.mappings)
                if where is None and not refreshed:
                    # A mapping made a moment ago: look again before ignoring the object.
                    await self.refresh()
                    refreshed = True
                    where = map_change(change, self.mappings)
                if where is not None:
                    clean_path(where.path)  # a key the repo cannot hold fails here, alone
            except PermanentError as exc:
                batch.blame(msg, f"{object_url(change)}: {exc}")
                continue
            if where is None:
                log.debug("ingest: %s is in no mapped bucket prefix", object_url(change))
                continue
            group = groups.setdefault((where.repo, where.branch), {})
            current = group.get(where.path)
            if current is None or newer(change, current[0]):
                group[where.path] = (change, msg)
        return groups

    def _seen(self, change: ObjectChange) -> bool:
        """Whether a change of the same key with this sequencer or a later one was applied."""
        last = self._applied.get((change.bucket, change.key))
        return bool(
            change.sequencer and last and sequencer_key(change.sequencer) <= sequencer_key(last)
        )

    def _remember(self, change: ObjectChange) -> None:
        if not change.sequencer:
            return
        key = (change.bucket, change.key)
        self._applied[key] = change.sequencer
        self._applied.move_to_end(key)
        while len(self._applied) > REMEMBERED_KEYS:
            self._applied.popitem(last=False)

    async def _source_of(self, change: ObjectChange) -> tuple[ObjectSource, int] | None:
        """The in-place reference of a written object; asks the bucket when the event omits the
        ETag or size. None when the object is gone already (its removal event follows)."""
        url = object_url(change)
        if change.etag and change.size is not None:
            source = ObjectSource(url=url, etag=change.etag, version_id=change.version_id)
            return source, change.size
        head = getattr(self.store, "head_source", None)
        if head is None:
            return ObjectSource(url=url, version_id=change.version_id), change.size or 0
        info = await head(url)
        if info is None:
            log.info("ingest: %s is gone already; not committing it", url)
            return None
        version = change.version_id or info.version_id
        return ObjectSource(url=url, etag=info.etag, version_id=version), info.size

    async def _commit_group(
        self,
        repo: str,
        branch: str,
        entries: dict[str, tuple[ObjectChange, Msg]],
        batch: Batch,
    ) -> None:
        try:
            head = await self.repos.head(repo, branch)
            files = {f.path: f for f in await self.repos.files(head)}
        except PermanentError as exc:
            self._blame_all(repo, branch, entries, batch, exc)
            return
        puts: list[tuple[FileRef, ObjectChange, Msg]] = []
        deletes: list[str] = []
        for path, (change, msg) in sorted(entries.items()):
            if change.event == "delete":
                if path in files:
                    deletes.append(path)
                continue
            found = await self._source_of(change)
            if found is None:
                continue
            source, size = found
            existing = files.get(path)
            if existing is not None and existing.source == source and existing.size == size:
                continue  # this very version is in the head already
            puts.append((FileRef(path=path, size=size, source=source), change, msg))
        puts = drop_conflicts(puts, files, set(deletes), batch)
        if puts or deletes:
            if self.lease is not None:  # Superseded: the batch goes to the active replica
                self.lease.check()
            refs, base = [ref for ref, _, _ in puts], head.id if head else ""
            made_id = commit_id(repo, branch, base, refs, deletes)
            try:
                info = await self.repos.commit_files(
                    repo,
                    branch,
                    puts=refs,
                    deletes=deletes,
                    origin="ingest",
                    commit_id=made_id,
                    parent=base,
                )
            except BranchMoved as exc:  # not applied on top (a newer version of a key, maybe,
                raise TemporaryError(str(exc), delay=0.0) from None  # by a replica taking over)
            except PermanentError as exc:
                self._blame_all(repo, branch, entries, batch, exc)
                return
            done = f"{len(refs)} written, {len(deletes)} removed"
            log.info("ingest: %s@%s commit %s: %s", repo, branch, info.id, done)
        for change, _ in entries.values():
            self._remember(change)

    def _blame_all(
        self,
        repo: str,
        branch: str,
        entries: dict[str, tuple[ObjectChange, Msg]],
        batch: Batch,
        exc: PermanentError,
    ) -> None:
        reason = f"committing to {repo}@{branch}: {exc}"
        log.error("ingest: %s", reason)
        for msg in {id(m): m for _, m in entries.values()}.values():
            batch.blame(msg, reason)


async def _heartbeat(msgs: list[Msg]) -> None:
    """Keep a batch that takes long (a slow store, a big manifest) from being redelivered."""
    while True:
        await asyncio.sleep(HEARTBEAT)
        await keep_alive(msgs)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
