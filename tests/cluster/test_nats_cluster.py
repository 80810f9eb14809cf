"""datumflow on several hosts (tests/cluster/deployment.py): three nats-servers clustered with
JetStream, moto's S3 server, the control plane and workers, each on hosts of their own, every
stream, bucket and consumer kept on three servers.

Each test runs a job of a few hundred datums through one kind of fault (tests/cluster/faults.py)
and its recovery; the job ends SUCCESS with exact figures and the output a fault-free run makes.
The hosts are network namespaces (tests/hosts.py): this needs root and iproute2.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from datumflow.broker import subjects
from tests.cluster import faults
from tests.cluster.deployment import Deployment, Workload
from tests.natscluster import stream_info

# A job of a few hundred datums through a fault and its recovery: about a minute when the machine
# is quiet, twice that when it is not.
pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]
log = logging.getLogger(__name__)

DATUMS = 300


async def test_a_job_survives_the_sigkill_of_its_stream_leader_then_its_consumer_leader(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The DF_DATUMS leader is SIGKILLed a fifth of the way through and restarted once another is
    elected; once it has rejoined, the leader of the workers' consumer (maybe another server) is
    SIGKILLed and restarted, the job still running."""
    d = deployment
    # A twentieth of a second per datum: the job still runs when the second fault comes.
    workload = await Workload.start(d, tmp_path, sleep=0.05)
    job = await workload.job(DATUMS, seed=11)

    # Every stream datumflow declared is on three servers.
    for stream in (subjects.DATUMS_STREAM, subjects.RESULTS_STREAM, subjects.COMMITS_STREAM):
        assert (await stream_info(d.nats.url, stream)).config.num_replicas == 3

    await job.reach(DATUMS // 5)
    stream_fault = await faults.kill_stream_leader(d)
    assert await job.processed() < DATUMS, "the job ended before the second fault"
    consumer_fault = await faults.kill_consumer_leader(d, workload.pipeline)

    info = await job.wait()
    figures = await job.verify(
        info,
        scenario="stream leader, then consumer leader SIGKILL",
        faults=faults.tally([stream_fault, consumer_fault]),
    )
    log.warning(
        "%s; %s; %d datums ran twice; job of %d datums in %.1fs",
        stream_fault,
        consumer_fault,
        figures.rerun_datums,
        DATUMS,
        figures.seconds,
    )
    await faults.rejoin(d, d.nats.node(consumer_fault.node))


async def test_a_job_survives_its_stream_leader_partitioned_for_30s(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The host of the DF_DATUMS leader is cut off the network for 30 s mid-job: the two others
    elect a leader, the clients of the cut-off server move to them, and when the host comes back
    its server rejoins as a follower."""
    d = deployment
    workload = await Workload.start(d, tmp_path)
    job = await workload.job(DATUMS, seed=13)

    await job.reach(DATUMS // 5)
    fault = await faults.partition_stream_leader(d, seconds=30)

    info = await job.wait()
    figures = await job.verify(
        info, scenario="stream leader partitioned 30 s", faults=faults.tally([fault])
    )
    await faults.rejoin(d, d.nats.node(fault.node))
    log.warning(
        "%s; %d datums ran twice; job of %d datums in %.1fs",
        fault,
        figures.rerun_datums,
        DATUMS,
        figures.seconds,
    )


async def test_a_job_survives_a_rolling_restart_of_the_three_servers(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Each nats-server in turn is stopped (SIGTERM) and started again, the next only once the
    restarted one has caught up with the datums stream, as an upgrade of the cluster would go."""
    d = deployment
    # A tenth of a second per datum: the job runs through the restarts.
    workload = await Workload.start(d, tmp_path, sleep=0.1)
    job = await workload.job(DATUMS, seed=14)

    done_at_start = await job.reach(DATUMS // 10)
    assert done_at_start < DATUMS, "the job ended before the restarts"
    rolled = time.monotonic()
    restarts = await faults.rolling_restart(d)
    rolling = time.monotonic() - rolled

    info = await job.wait()
    figures = await job.verify(
        info, scenario="rolling restart of the three servers", faults=faults.tally(restarts)
    )
    log.warning(
        "rolling restart in %.1fs, from %d of %d datums done; %d datums ran twice; job in %.1fs",
        rolling,
        done_at_start,
        DATUMS,
        figures.rerun_datums,
        figures.seconds,
    )
