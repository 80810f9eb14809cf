"""A lease: one key of the `df_leases` bucket, held by one replica of a function at a time.

The bucket's messages live `LEASE_TTL` seconds (its max age). The holder writes its key again every
`RENEW_EVERY` seconds by compare-and-set on the revision it last wrote; a standby tries to create
the key every `POLL_EVERY` seconds, which succeeds only once the holder's last write has expired
(it died, hangs or is cut off) or was deleted (it stopped cleanly). The revision of the write that
took the lease is its *fence*: revisions only grow, so a newer holder's fence is higher, and a
record written with a fence refuses a writer with a lower one (the committer's job records).

A holder counts its lease as lost `LEASE_TTL` after it *sent* its last successful renewal, less a
margin: the server dates the key from when it got the write, later, so the holder gives up before
anyone else can take over. A process that was paused (SIGSTOP, a stalled VM) finds its lease
stale by its own monotonic clock when it wakes, and its next renewal fails; what it writes in
between is refused by the fence.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from datumflow.broker import subjects
from datumflow.broker.connection import TRANSIENT, Broker, broker_errors
from datumflow.broker.kv import Records
from datumflow.broker.records import LeaseInfo
from datumflow.broker.topology import LEASE_TTL
from datumflow.errors import BrokerError, Conflict, DatumflowError, Superseded

log = logging.getLogger(__name__)

RENEW_EVERY = 1.0
"""Seconds between the starts of two renewals (datumflow.runtime.leader): one that waits its
whole ATTEMPT for an answer is followed at once by another, which has what is left of the lease
to get through."""
POLL_EVERY = 0.5
"""Seconds between a standby's tries to take the lease."""
MARGIN = 0.5
"""Seconds before the server could expire the key at which the holder already counts it lost."""
ATTEMPT = 2.0
"""Seconds one write of the lease waits for its answer."""


class Lease:
    """One function's lease, as seen by one replica."""

    def __init__(self, broker: Broker, *, name: str, ttl: float = LEASE_TTL) -> None:
        self.broker = broker
        self.name = name
        self.ttl = ttl
        self.fence = 0
        """The revision that took the lease while it is held; 0 while not."""
        self._revision = 0
        self._valid_until = 0.0
        self._info = LeaseInfo(holder="", host=socket.gethostname(), pid=os.getpid(), since=0.0)

    @property
    def holder(self) -> str:
        return self._info.holder

    def held(self) -> bool:
        """Whether the lease is ours and cannot have run out yet, by our own clock."""
        return self.fence > 0 and time.monotonic() < self._valid_until

    def check(self) -> None:
        """Raise Superseded unless the lease is held: called before a write only the active
        replica may make."""
        if not self.held():
            raise Superseded(f"the {self.name} lease is no longer ours")

    def drop(self) -> None:
        """Forget the lease (it was lost, or a newer holder's fence was seen)."""
        self.fence = 0
        self._revision = 0

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it; True if we hold it now."""
        info = msgspec.structs.replace(
            self._info,
            holder=f"{self._info.host}:{self._info.pid}/{secrets.token_hex(4)}",
            since=time.time(),
        )
        sent = time.monotonic()
        kv = await self.broker.kv(subjects.LEASES_BUCKET)
        payload = msgspec.json.encode(info)
        self._info = info
        async with broker_errors(f"taking the {self.name} lease"):
            try:
                revision = await asyncio.wait_for(kv.create(self.name, payload), ATTEMPT)
            except (KeyWrongLastSequenceError, KeyNotFoundError):
                # Held by another; or held a moment ago and expired while the client looked at
                # it (a create that finds a key reads it, and the read finds it gone): either
                # way not ours now, and tried again at the next round.
                return False
            except TRANSIENT:
                # The write may have been applied with its answer lost: then the key is ours.
                if not await self._still_ours():
                    return False
                revision = self._revision
        self.fence = self._revision = revision
        self._valid_until = sent + self.ttl - MARGIN
        return True

    async def renew(self) -> bool:
        """Write the lease again; False (and the lease dropped) if it is not ours any more."""
        if not self.fence:
            return False
        sent = time.monotonic()
        if sent >= self._valid_until:
            log.warning("lease %s: ran out before it could be renewed", self.name)
            self.drop()
            return False
        kv = await self.broker.kv(subjects.LEASES_BUCKET)
        payload = msgspec.json.encode(self._info)
        for _ in range(2):
            try:
                async with broker_errors(f"renewing the {self.name} lease"):
                    # No longer than the lease lasts: past its end the answer is of no use.
                    left = max(self._valid_until - time.monotonic(), 0.05)
                    self._revision = await asyncio.wait_for(
                        kv.update(self.name, payload, last=self._revision), min(ATTEMPT, left)
                    )
            except Conflict:
                # Either someone else holds it, or a renewal of ours whose answer was lost is
                # there. That one was dated by the server when it got it, before `sent`: the
                # lease lasts from it, not from now, so it is written again on its revision.
                if not await self._still_ours():
                    self.drop()
                    return False
                sent = time.monotonic()
                continue
            except BrokerError as exc:
                log.warning("%s", exc)
                return self.held()  # tried again soon, while the lease lasts
            self._valid_until = sent + self.ttl - MARGIN
            return True
        return self.held()  # ours, but not written again: it lasts from the last write we know

    async def _still_ours(self) -> bool:
        kv = await self.broker.kv(subjects.LEASES_BUCKET)
        async with broker_errors(f"reading the {self.name} lease"):
            try:
                entry = await asyncio.wait_for(kv.get(self.name), ATTEMPT)
            except (KeyNotFoundError, *TRANSIENT):
                return False
        if not entry.value:
            return False
        try:
            current = msgspec.json.decode(entry.value, type=LeaseInfo)
        except msgspec.DecodeError:
            return False
        if current.holder != self._info.holder:
            return False
        self._revision = entry.revision or self._revision
        return True

    async def release(self) -> None:
        """Give the lease up at once (a clean stop), so a standby need not wait for the TTL."""
        if not self.fence:
            return
        revision, self.fence = self._revision, 0
        try:
            kv = await self.broker.kv(subjects.LEASES_BUCKET)
            async with broker_errors(f"giving the {self.name} lease up"):
                await asyncio.wait_for(kv.delete(self.name, last=revision), ATTEMPT)
        except DatumflowError:
            pass  # someone else's already, or it expires on its own


async def holders(broker: Broker) -> dict[str, tuple[LeaseInfo, int]]:
    """Each held lease: its holder and fence-or-revision, by function name."""
    records = Records(broker, bucket=subjects.LEASES_BUCKET, type=LeaseInfo)
    out: dict[str, tuple[LeaseInfo, int]] = {}
    for name in await records.keys():
        try:
            out[name] = await records.get(name)
        except Exception:
            continue  # expired between the listing and the read
    return out
