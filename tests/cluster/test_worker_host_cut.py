"""A worker host cut off the network past `ack_wait`, on the deployment of tests/cluster/
deployment.py: its datums are redone on another host, the job ends, and when the host comes back its
late results and acks change nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from tests.cluster import faults
from tests.cluster.deployment import ACK_WAIT, Deployment, Workload
from tests.helpers import eventually

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]
log = logging.getLogger(__name__)

DATUMS = 300


async def test_late_results_of_a_worker_host_cut_off_change_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The host of two workers is cut off the network for longer than ack_wait while they hold
    datums: those are given to the workers of another host, the job ends without them, and when
    the host comes back its late results and acks (which NATS accepts) change nothing."""
    d = deployment
    # A tenth of a second per datum: the workers of the cut host surely hold one when it is cut.
    workload = await Workload.start(d, tmp_path, sleep=0.1)
    job = await workload.job(DATUMS, seed=12)

    await job.reach(DATUMS // 5)
    w1 = d.lab["w1"]
    w1.cut()
    cut = time.monotonic()
    # The datums the cut host holds come back only past ack_wait, however fast the others go.
    workload.pace(0)
    before = await asyncio.to_thread(faults.from_host, d.nats, w1.address)
    info = await job.wait(timeout=120)
    assert time.monotonic() - cut > float(ACK_WAIT), "the job ended before a redelivery"
    w1.heal()
    await eventually(
        lambda: asyncio.to_thread(
            lambda: faults.sent_since(before, faults.from_host(d.nats, w1.address)) > 0
        ),
        # The cut-off clients find their servers again only after giving the old connection up.
        timeout=120,
        what="the cut-off host's late messages to reach the broker",
    )
    figures = await job.verify(
        info, scenario="worker host cut off past ack_wait", faults={"worker host link cut": 1}
    )
    # The datums the cut-off workers held ran twice, once there and once elsewhere.
    assert figures.rerun_datums >= 1, figures
    assert await job.info() == info
    log.warning(
        "worker host cut for %.1fs; %d datums ran twice; job of %d datums in %.1fs",
        time.monotonic() - cut,
        figures.rerun_datums,
        DATUMS,
        figures.seconds,
    )
