"""What the list and inspect commands print, against a real `datumflow up`: `--json` with every
field every time (a filter on a field at its default finds the record), and human output with
times and durations as people read them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import Cluster, create_pipeline, shared_cluster

PIPELINE = {
    "pipeline": {"name": "copy"},
    "input": {"pfs": {"repo": "letters", "glob": "/*"}},
    "transform": {"cmd": ["sh", "-c", "cp /pfs/letters/* /pfs/out/"]},
}


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    """A cluster where a user commit went through a pipeline: its job id."""
    root = tmp_path_factory.mktemp("cli-output")
    with shared_cluster(root) as cluster:
        cluster.cli("create", "repo", "letters")
        cluster.cli("put", "file", "letters@master:/a.txt", "-f", "-", input=b"a\n")
        create_pipeline(cluster, root, PIPELINE)
        cluster.cli("wait", "commit", "letters@master", "--timeout", "120")
        jobs = json.loads(cluster.cli("list", "job", "-p", "copy", "--json").stdout)
        assert jobs and jobs[0]["state"] == "success", jobs
        yield cluster, jobs[0]["id"]


def select(cluster: Cluster, *args: str, **where: Any) -> list[dict]:
    """`datumflow ARGS --json | jq 'map(select(.k == v and ...))'`."""
    records = json.loads(cluster.cli(*args, "--json").stdout)
    assert isinstance(records, list), records
    return [r for r in records if all(k in r and r[k] == v for k, v in where.items())]


def test_json_lists_carry_fields_at_their_defaults(ran: tuple[Cluster, str]) -> None:
    cluster, job = ran
    assert select(cluster, "list", "repo", description="", pipeline="", name="letters")
    # A user commit: origin "user", no job, and the first one has no parent.
    user = select(cluster, "list", "commit", "letters@master", origin="user", job="", parent="")
    assert len(user) == 1, user
    assert select(cluster, "list", "file", "letters@master", path="/a.txt", type="file")
    assert select(cluster, "list", "pipeline", name="copy", reason="")
    done = select(
        cluster, "list", "job", "-p", "copy", id=job, data_failed=0, data_skipped=0, reason=""
    )
    assert len(done) == 1, done
    assert select(cluster, "list", "datum", f"copy@{job}", state="success")
    # Inspect commands too: every field of the record.
    commit = json.loads(cluster.cli("inspect", "commit", "letters@master", "--json").stdout)
    assert commit["origin"] == "user" and commit["provenance"] == []
    info = json.loads(cluster.cli("inspect", "job", f"copy@{job}", "--json").stdout)
    assert info["data_failed"] == 0 and info["reason"] == ""


EPOCH = re.compile(r"\b1[6-9]\d{8}(\.\d+)?\b")
"""A raw Unix time (2020s-2030s) as a float or integer."""
LONG_FLOAT = re.compile(r"\d\.\d{4,}")


def test_human_output_shows_times_and_durations_as_people_read_them(
    ran: tuple[Cluster, str],
) -> None:
    cluster, job = ran
    for args in (
        ("inspect", "pipeline", "copy"),
        ("inspect", "job", f"copy@{job}"),
        ("inspect", "datum", f"copy@{job}", _first_datum(cluster, job)),
    ):
        text = cluster.cli(*args).stdout
        assert not EPOCH.search(text), f"datumflow {' '.join(args)} shows a raw epoch:\n{text}"
        assert not LONG_FLOAT.search(text), f"datumflow {' '.join(args)}:\n{text}"
    job_text = cluster.cli("inspect", "job", f"copy@{job}").stdout
    # A local date and time, and how long ago.
    assert re.search(r"created: .*\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", job_text), job_text
    assert "ago" in job_text, job_text
    # Durations in the units a person would use.
    assert re.search(r"process_time: \d+(\.\d)? ?(µs|ms|s)\b", job_text), job_text
    # --json keeps the numbers as they are.
    info = json.loads(cluster.cli("inspect", "job", f"copy@{job}", "--json").stdout)
    assert isinstance(info["created"], float) and info["created"] > 1.6e9
    assert isinstance(info["stats"]["process_time"], float)


def _first_datum(cluster: Cluster, job: str) -> str:
    datums = json.loads(cluster.cli("list", "datum", f"copy@{job}", "--json").stdout)
    return str(datums[0]["id"])
