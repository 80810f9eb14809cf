"""`datumflow up` against a broker it did not start (DATUMFLOW_NATS_URL), as the README offers: one
without a monitoring endpoint too, where the local scaler reads each pipeline's lag from
JetStream's consumer info instead of /jsz."""

from __future__ import annotations

import asyncio
from pathlib import Path

from datumflow.runtime.embedded import EmbeddedServer
from tests.helpers import Cluster, cluster_env, create_pipeline

PIPELINE = {
    "pipeline": {"name": "upper"},
    "input": {"pfs": {"repo": "words", "glob": "/*"}},
    "transform": {"cmd": ["sh", "-c", "tr a-z A-Z < /pfs/words/w.txt > /pfs/out/w.txt"]},
}


def test_up_on_a_broker_without_monitoring_scales_workers_and_finishes_jobs(
    tmp_path: Path,
) -> None:
    server = EmbeddedServer(
        store_dir=tmp_path / "nats", monitor_port=-1, log_file=tmp_path / "nats-server.log"
    )
    assert server.monitor == ""
    server.start()
    cluster = None
    try:
        asyncio.run(server.wait_ready())
        home = tmp_path / "home"
        env = cluster_env(home, server)
        env.pop("DATUMFLOW_MONITOR_URL")
        cluster = Cluster(home=home, server=server, env=env)
        cluster.start()
        cluster.cli("create", "repo", "words")
        cluster.cli("put", "file", "words@master:/w.txt", "-f", "-", input=b"hello\n")
        create_pipeline(cluster, tmp_path, PIPELINE)
        cluster.cli("wait", "commit", "words@master", "--timeout", "60")
        assert cluster.cli("get", "file", "upper@master:/w.txt").stdout == "HELLO\n"
        assert "reading lag" not in cluster.log("up"), cluster.log("up")
    finally:
        if cluster is not None:
            cluster.stop()
        server.stop()
