"""The console's pure parts: the token rules, addresses and URLs, and how its views shape records
(the datum order, a job's figures, the DAG's nodes and edges). No broker: datumflow.console.views
reads, these shape."""

from __future__ import annotations

import json

import pytest

from datumflow.broker.messages import DatumResult, DatumStats, FileRef
from datumflow.broker.records import DatumIndexEntry, JobInfo, PipelineInfo, RepoInfo
from datumflow.console import auth
from datumflow.console.run import console_url, parse_address
from datumflow.console.views import FinishedJobs, dag_view, datum_rows, job_view
from datumflow.errors import DatumflowError
from datumflow.spec import load_spec


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.5", False),
        ("console.example", False),
    ],
)
def test_loopback(host: str, loopback: bool) -> None:
    assert auth.is_loopback(host) is loopback


def test_reading_needs_the_token_beyond_loopback_only() -> None:
    none: dict[str, str] = {}
    local = {"Host": "127.0.0.1:7480"}
    assert auth.may_read(loopback=True, token="t0k", headers=local, query=none, cookies=none)
    assert not auth.may_read(loopback=False, token="t0k", headers=none, query=none, cookies=none)
    for where in [
        {"headers": {"X-Datumflow-Token": "t0k"}},
        {"headers": {"Authorization": "Bearer t0k"}},
        {"query": {"token": "t0k"}},
        {"cookies": {"datumflow_token": "t0k"}},
    ]:
        given = {"headers": none, "query": none, "cookies": none, **where}
        assert auth.may_read(loopback=False, token="t0k", **given), where
        wrong = {k: {n: "nope" for n in v} for k, v in given.items()}
        assert not auth.may_read(loopback=False, token="t0k", **wrong), where


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1:7480", True),
        ("127.0.0.1", True),
        ("localhost:7480", True),
        ("LOCALHOST", True),
        ("[::1]:7480", True),
        ("[::1]", True),
        ("rebound.example:7480", False),  # DNS rebinding: another site's name, our address
        ("rebound.example", False),
        ("127.0.0.1.rebound.example", False),
        ("[::1", False),
        ("", False),
    ],
)
def test_loopback_reads_need_a_loopback_host(host: str, local: bool) -> None:
    none: dict[str, str] = {}
    headers = {"Host": host}
    assert auth.may_read(loopback=True, token="t0k", headers=headers, query=none, cookies=none) is (
        local
    )
    # The token still opens it, whatever the name.
    with_token = {**headers, "X-Datumflow-Token": "t0k"}
    assert auth.may_read(loopback=True, token="t0k", headers=with_token, query=none, cookies=none)


def test_acting_needs_the_token_in_a_header() -> None:
    assert auth.may_act(token="t0k", headers={"X-Datumflow-Token": "t0k"})
    assert auth.may_act(token="t0k", headers={"Authorization": "Bearer t0k"})
    assert not auth.may_act(token="t0k", headers={})
    assert not auth.may_act(token="t0k", headers={"X-Datumflow-Token": "t0"})
    # An empty token never matches, not even an empty one.
    assert not auth.may_act(token="", headers={"X-Datumflow-Token": ""})


def test_addresses_and_urls() -> None:
    assert parse_address("127.0.0.1:7480") == ("127.0.0.1", 7480)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address(":8080") == ("0.0.0.0", 8080)
    for bad in ["7480", "host:port", "host:70000"]:
        with pytest.raises(DatumflowError, match="expected host:port"):
            parse_address(bad)
    assert console_url("127.0.0.1", 7480, "abc") == "http://127.0.0.1:7480/?token=abc"
    assert console_url("0.0.0.0", 80, "abc") == "http://127.0.0.1:80/?token=abc"
    assert console_url("::1", 80, "abc") == "http://[::1]:80/?token=abc"


def result(datum: str, state: str, seconds: float, **fields: object) -> DatumResult:
    return DatumResult(
        pipeline="p",
        job="j",
        datum=datum,
        state=state,  # type: ignore[arg-type]
        stats=DatumStats(process_time=seconds),
        **fields,  # type: ignore[arg-type]
    )


def job(**fields: object) -> JobInfo:
    base: dict[str, object] = {"pipeline": "p", "id": "j", "version": 1, "seq": 1, "created": 100.0}
    return JobInfo(**{**base, **fields})  # type: ignore[arg-type]


def test_datums_failed_first_then_slowest() -> None:
    first = {
        "fast": result("fast", "success", 0.1),
        "slow": result("slow", "success", 5.0),
        "bad": result(
            "bad",
            "failed",
            0.2,
            error="exit 3",
            logs="k",
            attempts=2,
            files=[FileRef(path="/b")],
        ),
        "mid": result("mid", "recovered", 1.0),
    }
    rows = datum_rows(job(state="running"), first, {})
    assert [r["id"] for r in rows] == ["bad", "slow", "mid", "fast"]
    bad = rows[0]
    assert (bad["state"], bad["error"], bad["attempts"], bad["files"], bad["has_log"]) == (
        "failed",
        "exit 3",
        2,
        ["/b"],
        True,
    )


def test_a_finished_jobs_index_says_what_counted() -> None:
    first = {"a": result("a", "success", 1.0), "late": result("late", "success", 9.0)}
    index = {"a": DatumIndexEntry(datum="a", hash="h", state="success")}
    done = job(state="killed", datums="key", finished=130.0)
    rows = {r["id"]: r for r in datum_rows(done, first, index)}
    # The result that came after the job was killed did not count: no figures shown for it.
    assert rows["a"]["time"] == 1.0
    assert rows["late"]["time"] == 0.0


def test_job_figures() -> None:
    running = job(
        state="running",
        data_total=10,
        data_processed=4,
        data_skipped=1,
        data_failed=1,
        data_recovered=0,
        started=110.0,
    )
    view = job_view(running, now=130.0)
    assert (view["queued"], view["progress"], view["duration"]) == (4, 0.6, 20.0)
    done = job(state="success", data_total=0, started=110.0, finished=112.5)
    view = job_view(done, now=500.0)
    assert (view["queued"], view["progress"], view["duration"]) == (0, 1.0, 2.5)


def test_dag_nodes_and_edges() -> None:
    def pipeline(name: str, inp: dict[str, object], **more: object) -> PipelineInfo:
        doc = {"pipeline": {"name": name}, "input": inp, "transform": {"cmd": ["true"]}, **more}
        spec = load_spec(json.dumps(doc), source="test")
        return PipelineInfo(name=name, version=1, spec=spec, salt="s", created=1, updated=1)

    pipelines = [
        pipeline("edges", {"pfs": {"repo": "images", "glob": "/*"}}),
        pipeline(
            "montage",
            {
                "cross": [
                    {"pfs": {"repo": "images", "glob": "/"}},
                    {"pfs": {"repo": "edges", "glob": "/"}},
                ]
            },
            autoscaling=True,
        ),
    ]
    repos = [
        RepoInfo(name="images", created=1),
        RepoInfo(name="edges", created=1, pipeline="edges"),
        RepoInfo(name="montage", created=1, pipeline="montage"),
    ]
    latest = {"edges": {"lag": 3, "running": 2, "desired": 2, "state": "running"}}
    dag = dag_view(repos, pipelines, latest, {})
    nodes = {n["id"]: n for n in dag["nodes"]}
    assert {k: n["kind"] for k, n in nodes.items()} == {
        "images": "repo",
        "edges": "pipeline",
        "montage": "pipeline",
    }
    assert (nodes["edges"]["lag"], nodes["edges"]["running"]) == (3, 2)
    assert nodes["montage"]["state"] == "standby"  # autoscaled, no workers
    assert {(e["from"], e["to"]) for e in dag["edges"]} == {
        ("images", "edges"),
        ("images", "montage"),
        ("edges", "montage"),
    }


def test_finished_jobs_kept_within_a_count_of_results() -> None:
    def results(n: int) -> dict[str, DatumResult]:
        return {f"d{i}": result(f"d{i}", "success", 0.1) for i in range(n)}

    kept = FinishedJobs(jobs=3, results=10)
    kept.put(("p", "huge"), results(11), {})
    assert kept.get(("p", "huge")) is None and kept.results == 0  # read again when shown
    for name, n in [("a", 4), ("b", 4)]:
        kept.put(("p", name), results(n), {})
    assert kept.get(("p", "a")) is not None  # now the most recently shown
    kept.put(("p", "c"), results(4), {})  # 12 > 10: the least recently shown goes
    assert kept.get(("p", "b")) is None
    assert kept.get(("p", "a")) is not None and kept.get(("p", "c")) is not None
    assert (len(kept), kept.results) == (2, 8)
    for name in "def":
        kept.put(("p", name), results(1), {})
    assert len(kept) == 3 and kept.results <= 10  # and never more than `jobs` jobs
