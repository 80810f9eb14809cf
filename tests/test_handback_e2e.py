"""A stopping worker hands back the datums it holds without failing them: a scale-down's SIGTERM
is no attempt of the user code, and `datum_tries` counts only those; a datum given back still
ends FAILED once its worker died during each attempt left."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import pytest

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.messages import DatumTask
from datumflow.broker.pull import Puller
from datumflow.broker.settle import nak
from datumflow.broker.topology import ensure_pipeline_consumers
from datumflow.functions.worker.handback import attempt_of, hand_back, spent
from datumflow.spec import load_spec
from datumflow.transform import Datum
from tests.helpers import (
    HOST_PID,
    REPO_ROOT,
    Cluster,
    create_pipeline,
    dead,
    eventually,
    put_files,
    shared_cluster,
    wait_job_done,
)

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # A stopping worker gives its datum in hand 1 s before handing it back too.
    root = tmp_path_factory.mktemp("handback-e2e")
    extra = {"DATUMFLOW_ACK_WAIT": "2", "DATUMFLOW_GRACE": "1", "PYTHONPATH": str(REPO_ROOT)}
    with shared_cluster(root, **extra) as shared:
        yield shared


def names(folder: Path) -> list[str]:
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir())


def gated_copy(inputs: dict[str, Path], out: Path, *, datum: Datum) -> None:
    """The in-process code the workers call: from the second datum started on, wait for the gate."""
    started, gate = Path(datum.env["STARTED"]), Path(datum.env["GATE"])
    source = inputs["later"]
    (started / f"{source.name}.{time.time_ns()}").touch()
    if len(list(started.iterdir())) >= 2:
        while not gate.exists():
            time.sleep(0.02)
    (out / source.name).write_bytes(source.read_bytes())
    (Path(datum.env["DONE"]) / f"{source.name}.{time.time_ns()}").touch()


async def in_hand(cluster: Cluster, pipeline: str) -> int:
    """Datum messages delivered to the pipeline's workers and not settled yet (an in-process
    function's set of datums is one message)."""
    assert cluster.server is not None
    nc = await nats.connect(cluster.server.url)
    try:
        info = await nc.jetstream().consumer_info(
            subjects.DATUMS_STREAM, subjects.worker_consumer(pipeline)
        )
        return info.num_ack_pending
    finally:
        await nc.close()


async def test_a_stopped_worker_fails_none_of_the_datums_it_held(
    cluster: Cluster, tmp_path: Path
) -> None:
    started, done, gate = tmp_path / "started", tmp_path / "done", tmp_path / "gate"
    started.mkdir()
    done.mkdir()
    files = {f"/{n}": n.encode() for n in "abcde"}
    await put_files(cluster, "letters", files)
    # One worker takes the five datums as one set; each waits for the gate the test opens.
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "held"},
            "input": {"pfs": {"repo": "letters", "glob": "/*"}},
            "transform": {
                "cmd": [
                    "sh",
                    "-c",
                    f"{HOST_PID}; "
                    'for f in /pfs/letters/*; do n=$(basename "$f"); touch "$STARTED/$n.$pid";'
                    ' while [ ! -e "$GATE" ]; do sleep 0.05; done;'
                    ' cp "$f" /pfs/out/; touch "$DONE/$n.$pid"; done',
                ],
                "env": {"STARTED": str(started), "DONE": str(done), "GATE": str(gate)},
            },
            "parallelism_spec": {"constant": 1},
            "datum_set_spec": {"number": 5},
            "datum_tries": 1,
        },
    )
    await eventually(lambda: len(names(started)) == 1, what="the first datum to start")
    [first] = names(started)
    # SIGTERM, as a scale-down sends it: the datum in hand outlives the grace, the other four
    # were never started. None of the five was an attempt of the code.
    [pid] = cluster.worker_pids("held")
    os.kill(pid, signal.SIGTERM)
    await eventually(lambda: dead(pid), what="the stopped worker's exit", timeout=30)
    gate.touch()
    [job] = await wait_job_done(cluster, "held", timeout=60)
    assert job.state == "success", job.reason
    assert (job.data_total, job.data_processed, job.data_failed) == (5, 5, 0)
    assert names(done) == list("abcde")  # each datum ran to its end once
    # The interrupted one started again; the four handed back unstarted started once.
    assert names(started) == sorted([*"abcde", first])


async def test_a_datum_given_back_keeps_its_attempts_and_ends_failed_after_the_last(
    broker: Broker,
) -> None:
    spec = load_spec(
        '{"pipeline": {"name": "back"}, "input": {"pfs": {"repo": "in", "glob": "/*"}},'
        ' "transform": {"cmd": ["true"]}, "datum_tries": 2}'
    )
    await ensure_pipeline_consumers(broker, spec, ack_wait=30)
    task = DatumTask(pipeline="back", version=1, job="j1", datum="d1", hash="h", inputs=[])
    await broker.publish(subjects.datum("back"), task, msg_id="j1:d1")
    puller = Puller(broker, stream=subjects.DATUMS_STREAM, durable=subjects.worker_consumer("back"))

    try:
        [msg] = await puller.fetch(batch=5, wait=5)
        await nak(msg)  # attempt 1 failed: the code ran, and that counts
        [msg] = await puller.fetch(batch=5, wait=5)
        assert msg.metadata.num_delivered == 2
        await hand_back(broker, [msg])  # attempt 2 never started: a stop gave it back
        [msg] = await puller.fetch(batch=5, wait=5)
        again = msgspec.json.decode(msg.data, type=DatumTask)
        # A new message: the server counts from 1 again, the task carries the attempt made.
        assert (msg.metadata.num_delivered, again.tries) == (1, 1)
        assert attempt_of(msg, again) == 2
        assert spent([(msg, again)], datum_tries=2) == ([(msg, again)], [])
        await nak(msg)  # its worker died during attempt 2
        [msg] = await puller.fetch(batch=5, wait=5)
        run, [(failed_msg, result)] = spent([(msg, again)], datum_tries=2)
        assert run == [] and failed_msg is msg
        assert (result.state, result.attempts, result.datum) == ("failed", 2, "d1")
        assert "died during each of its 2 attempts" in result.error
        info = await broker.js.stream_info(subjects.DATUMS_STREAM)
        assert info.state.messages == 1  # the one given back was acked, not left behind
    finally:
        await puller.close()


async def test_a_stopped_worker_fails_none_of_a_set_fetched_ahead(
    cluster: Cluster, tmp_path: Path
) -> None:
    started, done, gate = tmp_path / "started", tmp_path / "done", tmp_path / "gate"
    started.mkdir()
    done.mkdir()
    files = {f"/{n}": n.encode() for n in "uvwxyz"}
    await put_files(cluster, "later", files)
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "ahead"},
            "input": {"pfs": {"repo": "later", "glob": "/*"}},
            "transform": {
                "function": "tests.test_handback_e2e:gated_copy",
                "env": {"STARTED": str(started), "DONE": str(done), "GATE": str(gate)},
            },
            "parallelism_spec": {"constant": 1},
            "datum_set_spec": {"number": 2},
            "datum_tries": 1,
        },
    )
    # The first set's second datum waits at the gate; as it started, the next set was fetched
    # ahead: two sets, each one message of two datums, held.
    await eventually(lambda: len(names(started)) == 2, what="the first set's two datums")
    await eventually(lambda: in_hand(cluster, "ahead"), until=lambda n: n == 2, what="a set ahead")
    first_set = names(started)
    [pid] = cluster.worker_pids("ahead")
    os.kill(pid, signal.SIGTERM)
    await eventually(lambda: dead(pid), what="the stopped worker's exit", timeout=30)
    gate.touch()
    [job] = await wait_job_done(cluster, "ahead", timeout=60)
    assert job.state == "success", job.reason
    assert (job.data_total, job.data_processed, job.data_failed) == (6, 6, 0)
    # The set fetched ahead, never started, was handed back and ran once. (Of the first set,
    # the datum interrupted past the grace runs again; so may the one that finished, when the
    # stop came before its result reached the loop.)
    runs = names(done)
    assert sorted(set(runs)) == list("uvwxyz")
    assert [n for n in runs if n not in first_set] == sorted(set("uvwxyz") - set(first_set))
