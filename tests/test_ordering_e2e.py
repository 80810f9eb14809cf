"""Invariant 6: output commits of a pipeline are made in the order of its input commits."""

from __future__ import annotations

from pathlib import Path

import pytest

from datumflow.broker.messages import FileRef
from tests.helpers import Cluster, create_pipeline, wait_job_done


@pytest.mark.asyncio
async def test_output_commits_follow_input_order(cluster: Cluster, tmp_path: Path) -> None:
    spec = {
        "pipeline": {"name": "stamp"},
        "input": {"pfs": {"repo": "events", "glob": "/*"}},
        # Uneven datum times, so a later commit would overtake an earlier one if jobs raced.
        "transform": {
            "cmd": [
                "sh",
                "-c",
                "n=$(cat /pfs/events/*); sleep 0.$((n % 3)); cp /pfs/events/* /pfs/out/",
            ]
        },
        "parallelism_spec": {"constant": 2},
    }
    async with cluster.api() as api:
        await api.repos.create_repo("events")
    create_pipeline(cluster, tmp_path, spec)
    inputs = []
    async with cluster.api() as api:
        for i in range(5):
            key, size = await api.store.put_bytes(f"{i}\n".encode())
            commit = await api.repos.commit_files(
                "events", "master", puts=[FileRef(path=f"/e{i}", size=size, hash=key)]
            )
            inputs.append(commit.id)

    jobs = await wait_job_done(cluster, "stamp", count=5, timeout=90)
    assert all(j.state == "success" for j in jobs), [j.reason for j in jobs]
    async with cluster.api() as api:
        outputs = list(reversed(await api.repos.list_commits("stamp")))
    # One output commit per input commit, parent to child in input order.
    assert [o.provenance[0].commit for o in outputs] == inputs
    assert [o.files for o in outputs] == [1, 2, 3, 4, 5]
    # Each job skipped what the previous one had done: only the new file was processed.
    by_input = {j.input_commits[0].commit: j for j in jobs}
    assert [(by_input[c].data_processed, by_input[c].data_skipped) for c in inputs] == [
        (1, i) for i in range(5)
    ]
