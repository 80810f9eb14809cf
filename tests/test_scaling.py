"""datumflow.scaling: the parallelism limit, the scaling numbers, KEDA's rule, lag from /jsz."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from datumflow import scaling
from datumflow.scaling import Scaler, ScalingError, ScalingParams, lag_from_jsz
from datumflow.spec import PipelineSpec, load_spec

DATA = Path(__file__).parent / "data"


def make_spec(**fields: Any) -> PipelineSpec:
    doc = {
        "pipeline": {"name": "edges"},
        "input": {"pfs": {"repo": "images", "glob": "/*"}},
        "transform": {"cmd": ["python3", "/edges.py"]},
        **fields,
    }
    return load_spec(json.dumps(doc))


def params(**overrides: Any) -> ScalingParams:
    base = dict(
        lag_threshold=3,
        activation_lag_threshold=0,
        cooldown_period=10.0,
        polling_interval=1.0,
        min_replicas=0,
        max_replicas=10,
        scale_down_window=0.0,
    )
    return ScalingParams(**(base | overrides))


# --- the parallelism limit ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parallelism", "nodes", "expected"),
    [
        ({}, 5, 1),  # missing: Pachyderm's default of one worker
        ({"constant": 0}, 5, 1),  # 0 means the default too
        ({"constant": 7}, 5, 7),
        ({"constant": 7}, 0, 7),  # a constant does not depend on the cluster
        ({"coefficient": 0.5}, 10, 5),  # the source document's example
        ({"coefficient": 2.0}, 10, 20),  # and its other one
        ({"coefficient": 0.5}, 7, 4),  # 3.5 rounds up
        ({"coefficient": 0.1}, 30, 3),  # 3.0000000000000004 in floating point: still 3
        ({"coefficient": 0.3}, 10, 3),  # same trap
        ({"coefficient": 0.7}, 10, 7),  # 7.000000000000001
        ({"coefficient": 0.01}, 3, 1),  # 0.03 rounds up to one worker
        ({"coefficient": 0.5}, 0, 1),  # no schedulable node yet: still one
    ],
)
def test_max_workers(parallelism: dict[str, Any], nodes: int, expected: int) -> None:
    spec = make_spec(parallelism_spec=parallelism)
    assert scaling.max_workers(spec, nodes=nodes) == expected


# --- the numbers for each place ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("place", "polling", "cooldown"),
    [("local", 1.0, 10.0), ("kubernetes", 5.0, 60.0)],
)
def test_params_defaults_per_place(place: scaling.Place, polling: float, cooldown: float) -> None:
    p = scaling.params_for(make_spec(autoscaling=True), nodes=3, place=place)
    assert p.polling_interval == polling
    assert p.cooldown_period == cooldown
    assert p.lag_threshold == 1
    assert p.activation_lag_threshold == 0
    assert (p.min_replicas, p.max_replicas) == (0, 1)


@pytest.mark.parametrize(
    ("fields", "bounds"),
    [
        ({"parallelism_spec": {"constant": 4}}, (4, 4)),  # fixed: min = max = parallelism
        ({"parallelism_spec": {"constant": 4}, "autoscaling": True}, (0, 4)),
        ({"parallelism_spec": {"constant": 4}, "standby": True}, (0, 4)),  # the 1.x spelling
        ({"parallelism_spec": {"coefficient": 1.5}, "autoscaling": True}, (0, 6)),
        ({"parallelism_spec": {"coefficient": 1.5}}, (6, 6)),
    ],
)
def test_params_replica_bounds(fields: dict[str, Any], bounds: tuple[int, int]) -> None:
    p = scaling.params_for(make_spec(**fields), nodes=4, place="kubernetes")
    assert (p.min_replicas, p.max_replicas) == bounds
    assert p.autoscaled == (bounds[0] == 0)


def test_params_overrides_from_spec() -> None:
    spec = make_spec(
        autoscaling=True,
        scaling={
            "lag_threshold": 20,
            "activation_lag_threshold": 0,
            "cooldown_period": 300,
            "polling_interval": 2.5,
        },
    )
    for place in ("local", "kubernetes"):
        p = scaling.params_for(spec, nodes=1, place=place)
        assert (p.lag_threshold, p.activation_lag_threshold) == (20, 0)
        assert (p.cooldown_period, p.polling_interval) == (300.0, 2.5)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"lag_threshold": 0}, "scaling.lag_threshold"),
        ({"activation_lag_threshold": -1}, "scaling.activation_lag_threshold"),
        ({"cooldown_period": -5}, "scaling.cooldown_period"),
        ({"polling_interval": 0}, "scaling.polling_interval"),
    ],
)
def test_params_reject_bad_overrides(override: dict[str, Any], field: str) -> None:
    with pytest.raises(ScalingError, match=field):
        scaling.params_for(make_spec(scaling=override), nodes=1, place="local")


# --- KEDA's rule --------------------------------------------------------------------------------

# Each case: the params that differ from `params()`, then (lag, now, expected replicas) in order.
RULE_CASES: dict[str, tuple[dict[str, Any], list[tuple[int, float, int]]]] = {
    "formula: ceil(lag / threshold)": (
        {},
        [(1, 0, 1), (3, 1, 1), (4, 2, 2), (6, 3, 2), (7, 4, 3), (29, 5, 10)],
    ),
    "clamped to max": ({}, [(31, 0, 10), (10_000, 1, 10)]),
    "stays at zero until activity": ({}, [(0, 0, 0), (0, 5, 0), (0, 100, 0)]),
    "activation threshold: lag must exceed it": (
        {"activation_lag_threshold": 5},
        [(5, 0, 0), (3, 1, 0), (6, 2, 2), (3, 3, 1)],
    ),
    "active but lag under one target still keeps one worker": (
        {},
        [(2, 0, 1), (0, 1, 1), (1, 2, 1)],
    ),
    "cooldown: back to zero only after cooldown_period without activity": (
        {},
        [(9, 0, 3), (0, 1, 1), (0, 9.9, 1), (0, 10, 0), (0, 11, 0)],
    ),
    "activity during cooldown restarts it": (
        {},
        [(9, 0, 3), (0, 5, 1), (1, 8, 1), (0, 17.9, 1), (0, 18, 0)],
    ),
    "wakes up from standby at once": ({}, [(9, 0, 3), (0, 20, 0), (30, 21, 10)]),
    "fixed parallelism ignores lag": (
        {"min_replicas": 4, "max_replicas": 4},
        [(0, 0, 4), (100, 1, 4), (0, 1000, 4)],
    ),
    "scale-down window holds the highest recent count": (
        {"scale_down_window": 5.0},
        [(27, 0, 9), (3, 2, 9), (3, 4.9, 9), (3, 5.5, 1), (0, 8, 1)],
    ),
    "scale-down window never delays scaling up": (
        {"scale_down_window": 5.0},
        [(3, 0, 1), (30, 1, 10)],
    ),
    "cooldown wins over the scale-down window": (
        {"scale_down_window": 60.0},
        [(30, 0, 10), (0, 10, 0), (3, 11, 1)],
    ),
    "threshold of one: one worker per outstanding datum": (
        {"lag_threshold": 1, "max_replicas": 4},
        [(1, 0, 1), (2, 1, 2), (4, 2, 4), (9, 3, 4), (2, 4, 2)],
    ),
}


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_scaler_rule(case: str) -> None:
    overrides, steps = RULE_CASES[case]
    scaler = Scaler(params(**overrides))
    got = [scaler.desired(lag, now) for lag, now, _ in steps]
    assert got == [expected for _, _, expected in steps]


def test_scaler_from_spec_matches_params() -> None:
    spec = make_spec(parallelism_spec={"constant": 3}, autoscaling=True)
    scaler = Scaler(scaling.params_for(spec, nodes=1, place="local"))
    assert [scaler.desired(lag, t) for lag, t in [(0, 0), (5, 1), (2, 2), (0, 3), (0, 13)]] == [
        0,
        3,
        3,  # within the 5 s local scale-down window
        3,
        0,  # 10 s local cooldown since t=2
    ]


# --- lag from /jsz ---------------------------------------------------------------------------------


@pytest.fixture
def jsz() -> dict[str, Any]:
    # Shaped as nats-server 2.14 answers GET /jsz?acc=$G&config=true&consumers=true.
    return json.loads((DATA / "jsz-2.14.json").read_text())


@pytest.mark.parametrize(
    ("stream", "consumer", "expected"),
    [
        ("DF_DATUMS", "df-worker-edges", 8),  # 5 pending + 3 ack pending
        ("DF_DATUMS", "df-worker-montage", 0),  # idle consumer: zero, not None
        ("DF_DATUMS", "df-worker-ingest-only", 6),  # nothing delivered yet
        ("DF_COMMITS", "df-planner-edges", 0),
        ("DF_DATUMS", "df-worker-missing", None),  # consumer not created (yet)
        ("DF_DATUMS", "df-planner-edges", None),  # right consumer, wrong stream
        ("DF_RESULTS", "df-worker-edges", None),  # stream without consumer_detail
        ("NO_SUCH_STREAM", "df-worker-edges", None),
    ],
)
def test_lag_from_jsz(
    jsz: dict[str, Any], stream: str, consumer: str, expected: int | None
) -> None:
    assert lag_from_jsz(jsz, stream=stream, consumer=consumer) == expected


def test_lag_from_jsz_account_filter(jsz: dict[str, Any]) -> None:
    # /jsz?accounts=true lists every account; the same names may exist in another one.
    other = copy.deepcopy(jsz["account_details"][0])
    other["name"] = other["id"] = "TEAM_B"
    other["stream_detail"][1]["consumer_detail"][0] |= {"num_pending": 30, "num_ack_pending": 10}
    jsz["account_details"].insert(0, other)
    kw = {"stream": "DF_DATUMS", "consumer": "df-worker-edges"}
    assert lag_from_jsz(jsz, account="$G", **kw) == 8
    assert lag_from_jsz(jsz, account="TEAM_B", **kw) == 40
    assert lag_from_jsz(jsz, account="NOBODY", **kw) is None


@pytest.mark.parametrize(
    "document",
    [
        {},  # JetStream disabled: no account_details at all
        {"account_details": None},
        {"account_details": [{"name": "$G"}]},  # account with no streams
        {"account_details": [{"name": "$G", "stream_detail": [{"name": "DF_DATUMS"}]}]},
    ],
)
def test_lag_from_jsz_sparse_documents(document: dict[str, Any]) -> None:
    assert lag_from_jsz(document, stream="DF_DATUMS", consumer="df-worker-edges") is None


def test_lag_from_jsz_missing_counters_are_zero() -> None:
    doc = {
        "account_details": [
            {
                "name": "$G",
                "stream_detail": [
                    {"name": "DF_DATUMS", "consumer_detail": [{"name": "df-worker-a"}]}
                ],
            }
        ]
    }
    assert lag_from_jsz(doc, stream="DF_DATUMS", consumer="df-worker-a") == 0


# --- draining a worker ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datum_timeout", "drain", "grace"),
    [
        (None, 30.0, 45),  # no datum_timeout: the default drain
        (0.0, 30.0, 45),
        (120.0, 120.0, 135),  # the datum is over within its timeout
        (2.5, 2.5, 18),  # rounded up to whole seconds
        (86_400.0, 900.0, 915),  # a day-long timeout would hold node drains for a day
    ],
)
def test_drain_and_grace(datum_timeout: float | None, drain: float, grace: int) -> None:
    assert scaling.drain_seconds(datum_timeout) == drain
    assert scaling.termination_grace_seconds(drain) == grace
