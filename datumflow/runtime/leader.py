"""Active/standby: run a function's body only while this replica holds the function's lease.

Two or more replicas of the committer (or of ingest) run at once; each waits for the lease
(datumflow.broker.lease), and the one that takes it runs the body, with a fresh state, until it
is told to stop or loses the lease. Losing it (a renewal refused, or not made in time, or the body
raising Superseded on a newer holder's fence) stops the body, which writes nothing more; the
replica then stands by again. A clean stop gives the lease up, so a standby takes over at once;
a death leaves it to run out, `LEASE_TTL` seconds after its last renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from datumflow.broker.lease import POLL_EVERY, RENEW_EVERY, Lease
from datumflow.errors import BrokerError, Superseded

log = logging.getLogger(__name__)

Body = Callable[[Lease, asyncio.Event], Coroutine[Any, Any, None]]
"""The function's work: runs until the event is set; checks the lease before what only the
active replica may do."""


async def lead(*, lease: Lease, stop: asyncio.Event, body: Body) -> None:
    """Stand by, take the lease, run `body` while it is held; again, until `stop`."""
    log.info("lease %s: standing by", lease.name)
    try:
        while not stop.is_set():
            try:
                taken = await lease.acquire()
            except BrokerError as exc:
                log.warning("lease %s: %s", lease.name, exc)
                taken = False
            if not taken:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=POLL_EVERY)
                continue
            log.info(
                "lease %s: active (holder %s, fence %d)", lease.name, lease.holder, lease.fence
            )
            await _term(lease=lease, stop=stop, body=body)
    finally:
        await lease.release()


async def _term(*, lease: Lease, stop: asyncio.Event, body: Body) -> None:
    """One term as the active replica: the body and the renewals, until either ends."""
    term = asyncio.Event()
    work = asyncio.create_task(body(lease, term))
    keeper = asyncio.create_task(_keep(lease=lease, stop=stop, term=term))
    try:
        await asyncio.wait({work, keeper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        term.set()
        try:
            await work
        except Superseded as exc:
            log.warning("lease %s: %s", lease.name, exc)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
    if stop.is_set():
        return
    lease.drop()
    log.warning("lease %s: lost; standing by", lease.name)


async def _keep(*, lease: Lease, stop: asyncio.Event, term: asyncio.Event) -> None:
    """Renew every RENEW_EVERY seconds, counted from when the last renewal began; return (ending
    the term) when the lease is lost, the body has ended, or we are told to stop.

    Counted from the start, a renewal whose answer was slow (up to ATTEMPT) is followed by the
    next one at once, while the lease lasts: a full RENEW_EVERY after the slow one would come
    after the lease ran out, and one stall of the broker would cost a takeover."""
    began = time.monotonic()
    while not (stop.is_set() or term.is_set()):
        wait = began + RENEW_EVERY - time.monotonic()
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
        if stop.is_set():
            return
        began = time.monotonic()
        try:
            if not await lease.renew():
                return
        except BrokerError as exc:
            log.warning("lease %s: renewing: %s", lease.name, exc)
            if not lease.held():
                return
        took = time.monotonic() - began
        if took > RENEW_EVERY:
            log.warning("lease %s: a renewal took %.1fs", lease.name, took)
