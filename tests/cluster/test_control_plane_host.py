"""The loss of the host that runs the active control plane, mid-job: `datumflow up` runs on two
hosts (cp and cp2), each with a planner, a committer, ingest and workers, on the cluster of
tests/cluster/deployment.py, with two more workers on w1. The committer and ingest are active on
one host and stand by on the other (a lease in `df_leases`); planners share the commit events.

cp starts first: its committer holds the lease and its planner plans the job; cp2 starts then.
Mid-job, cp loses power: its link goes down (nothing it sends gets out) and every process on it is
SIGKILLed. cp2's committer takes the lease, the job ends SUCCESS with exact figures and the output
a fault-free run makes, and the next job is planned and committed by cp2.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from tests.cluster.deployment import CONTROL, Deployment, Workload
from tests.cluster.faults import host_of, lease_holder, power_off
from tests.helpers import eventually

# Two control planes and a job of 200 datums of 1.5 s through the loss of one (0.1 s from the
# first datum counted after it): about two minutes on a busy machine.
pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(420)]
log = logging.getLogger(__name__)

HOSTS = ["n1", "n2", "n3", "s3", *CONTROL, "w1"]
DATUMS = 200


def planned_on(d: Deployment, job: str) -> list[str]:
    """The control hosts whose planner logged planning `job`."""
    return [
        host
        for host in CONTROL
        if any(
            f"@{job}" in line and "planning" in line
            for log_file in (d.root / host / "logs").glob("planner*.log")
            for line in log_file.read_text(errors="replace").splitlines()
        )
    ]


async def test_a_job_survives_the_loss_of_the_host_of_the_active_control_plane(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    first, survivor = CONTROL
    # A second and a half per datum: the job runs on past the start of the second control plane
    # (up to 45 s on a busy machine) and the takeover.
    workload = await Workload.start(d, tmp_path, sleep=1.5, control=[first])
    active = await eventually(
        lambda: lease_holder(d, "committer"), timeout=60, what="an active committer"
    )
    job = await workload.job(DATUMS, seed=21)
    await eventually(job.info, timeout=120, what="the job planned")
    # The second control plane starts once the first holds the lease and has planned the job.
    await workload.up(survivor)
    await job.reach(DATUMS // 10)
    current = await eventually(lambda: lease_holder(d, "committer"), what="an active committer")
    assert current.holder == active.holder, f"{current} took the lease from {active}"
    assert host_of(d, active.pid) == first
    assert planned_on(d, (await job.info()).id) == [first]  # type: ignore[union-attr]

    before = await job.processed()
    assert before < DATUMS, "the job ended before the fault"
    down = time.monotonic()
    new, takeover = await power_off(d, first, active)
    assert host_of(d, new.pid) == survivor
    await job.reach(before + 1, timeout=120)
    next_datum = time.monotonic() - down
    workload.pace(0.1)  # the fault is over: the rest of the job need not take minutes

    info = await job.wait(timeout=180)
    figures = await job.verify(
        info,
        scenario="host of the active planner and committer lost",
        faults={"control-plane host link cut and SIGKILLed": 1},
    )

    # The next job (a tenth of the files changed) is planned and committed by the survivor.
    second = await workload.job(DATUMS // 10, seed=22)
    after = await second.wait(timeout=120)
    assert after.state == "success", after
    counted = (after.data_total, after.data_processed, after.data_skipped, after.data_failed)
    assert counted == (DATUMS, DATUMS // 10, DATUMS - DATUMS // 10, 0), counted
    assert planned_on(d, after.id) == [survivor]
    log.warning(
        "%s lost (the active committer, %s, and the job's planner): %s took the lease after"
        " %.1fs, the next datum was counted %.1fs after the loss; %d datums ran twice; job of %d"
        " datums in %.1fs",
        first,
        active.holder,
        survivor,
        takeover,
        next_datum,
        figures.rerun_datums,
        DATUMS,
        figures.seconds,
    )
