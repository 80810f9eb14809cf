"""`datumflow list datum -f SPEC`: the dry run on the branch heads, and the refusal of bad specs by
it and by `create pipeline`. One `datumflow up` serves the whole module: nothing here runs a job."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from datumflow.cli.main import app
from tests.helpers import Cluster, put_files, shared_cluster

READINGS = {f"/ID1234/file{i}.txt": b"r" for i in range(1, 6)}
PARAMETERS = {f"/file{i}.txt": b"p" for i in range(1, 9)}
LIPIDS = {
    f"/LIPID-patientID{p}-labID{lab}.txt": b"l"
    for p, lab in [(1, 1), (2, 1), (1, 2), (3, 3), (1, 3), (2, 3)]
}
STATES = {f"/{state}/{city}.json": b"{}" for state, city in [("CA", "la"), ("CO", "den")]}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with shared_cluster(tmp_path_factory.mktemp("datum-cli")) as cluster:
        asyncio.run(_repos(cluster))
        yield cluster


async def _repos(cluster: Cluster) -> None:
    for repo, files in [
        ("readings", READINGS),
        ("parameters", PARAMETERS),
        ("labs", LIPIDS),
        ("states", STATES),
    ]:
        await put_files(cluster, repo, files)
    async with cluster.api() as api:
        await api.repos.create_repo("empty")


def spec_file(tmp_path: Path, inp: dict, name: str = "dry") -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(
        json.dumps({"pipeline": {"name": name}, "input": inp, "transform": {"cmd": ["true"]}})
    )
    return str(path)


def invoke(cluster: Cluster, *args: str) -> Result:
    """The command in this process (no interpreter to start): as `cluster.cli`, but quicker."""
    env = {k: v for k, v in cluster.env.items() if k.startswith("DATUMFLOW_")}
    return CliRunner().invoke(app, ["--home", str(cluster.home), *args], env=env)


def dry_run(cluster: Cluster, tmp_path: Path, inp: dict) -> list[dict]:
    result = invoke(cluster, "list", "datum", "-f", spec_file(tmp_path, inp), "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def paths(datums: list[dict]) -> list[list[tuple[str, str]]]:
    return [[(f["input"], f["path"]) for f in d["files"]] for d in datums]


JOIN = {
    "join": [
        {"pfs": {"repo": "readings", "glob": "/*/(*).txt", "join_on": "$1"}},
        {"pfs": {"repo": "parameters", "glob": "/(*).txt", "join_on": "$1"}},
    ]
}


def test_dry_run_of_a_join_inner_and_outer(shared: Cluster, tmp_path: Path) -> None:
    inner = dry_run(shared, tmp_path, JOIN)
    assert paths(inner) == [
        [("readings", f"/ID1234/file{i}.txt"), ("parameters", f"/file{i}.txt")] for i in range(1, 6)
    ]
    assert inner[0]["files"][0] == {
        "input": "readings",
        "repo": "readings",
        "path": "/ID1234/file1.txt",
    }
    assert all(len(d["id"]) == 64 for d in inner) and len({d["id"] for d in inner}) == 5

    outer = json.loads(json.dumps(JOIN))
    outer["join"][1]["pfs"]["outer_join"] = True
    datums = dry_run(shared, tmp_path, outer)
    assert paths(datums)[5:] == [[("parameters", f"/file{i}.txt")] for i in range(6, 9)]
    assert len(datums) == 8
    # The same datums get the same ids: what a job would run, and what it would skip.
    assert [d["id"] for d in datums[:5]] == [d["id"] for d in inner]


def test_dry_run_of_a_group_and_of_directories(shared: Cluster, tmp_path: Path) -> None:
    group = {"group": [{"pfs": {"repo": "labs", "glob": "/*-(*)-lab*.txt", "group_by": "$1"}}]}
    assert [len(d["files"]) for d in dry_run(shared, tmp_path, group)] == [3, 2, 1]
    # A directory is a datum, listed with its trailing slash, named by `name`.
    dirs = {"pfs": {"repo": "states", "name": "geo", "glob": "/C*"}}
    assert paths(dry_run(shared, tmp_path, dirs)) == [[("geo", "/CA/")], [("geo", "/CO/")]]
    # A union of one input with itself runs each datum once, as the planner queues it.
    twice = {
        "union": [
            {"pfs": {"repo": "states", "glob": "/*"}},
            {"pfs": {"repo": "states", "glob": "/*"}},
        ]
    }
    assert paths(dry_run(shared, tmp_path, twice)) == [[("states", "/CA/")], [("states", "/CO/")]]
    # An empty repo makes a cross empty.
    cross = {
        "cross": [
            {"pfs": {"repo": "states", "glob": "/*"}},
            {"pfs": {"repo": "empty", "glob": "/"}},
        ]
    }
    assert dry_run(shared, tmp_path, cross) == []


def test_dry_run_table_creates_nothing(shared: Cluster, tmp_path: Path) -> None:
    table = shared.cli("list", "datum", "-f", spec_file(tmp_path, JOIN)).stdout
    header, *rows = table.strip().splitlines()
    assert header.split() == ["ID", "FILES"]
    assert len(rows) == 5 and "readings:/ID1234/file1.txt, parameters:/file1.txt" in rows[0]
    assert json.loads(invoke(shared, "list", "pipeline", "--json").stdout) == []
    repos = {r["name"] for r in json.loads(invoke(shared, "list", "repo", "--json").stdout)}
    assert "dry" not in repos


BAD = [
    pytest.param(
        {"pfs": {"repo": "readings", "glob": "/[a"}},
        "input.pfs.glob: glob '/[a': '[' at position 1 is never closed",
        id="glob",
    ),
    pytest.param(
        {
            "join": [
                {"pfs": {"repo": "readings", "glob": "/*/(*).txt", "join_on": "$1"}},
                {"pfs": {"repo": "parameters", "glob": "/(*).txt", "join_on": "$2"}},
            ]
        },
        "input.join[1].pfs.join_on: $2 names a capture group the glob '/(*).txt' does not have",
        id="template",
    ),
    pytest.param(
        {
            "cross": [
                {"pfs": {"repo": "readings", "glob": "/*"}},
                {"pfs": {"repo": "readings", "glob": "/*/*"}},
            ]
        },
        "input.cross[1]: input name 'readings' is already used in this cross",
        id="duplicate-name",
    ),
    pytest.param(
        {"pfs": {"repo": "readings", "glob": "/*"}, "cross": []},
        "input: set exactly one of pfs, cross, union, join, group (found: pfs, cross)",
        id="two-types",
    ),
    pytest.param({}, "input: set exactly one of pfs, cross, union, join, group", id="no-type"),
]


@pytest.mark.parametrize(("inp", "message"), BAD)
def test_bad_specs_are_refused(shared: Cluster, tmp_path: Path, inp: dict, message: str) -> None:
    spec = spec_file(tmp_path, inp, name="bad")
    for command in (["list", "datum", "-f", spec], ["create", "pipeline", "-f", spec]):
        result = invoke(shared, *command)
        assert result.exit_code == 1, (command, result.stdout)
        assert message in " ".join(result.stderr.split()), (command, result.stderr)
        assert result.stdout == ""
    assert json.loads(invoke(shared, "list", "pipeline", "--json").stdout) == []


def test_dry_run_names_a_missing_repo_and_wants_one_target(shared: Cluster, tmp_path: Path) -> None:
    spec = spec_file(tmp_path, {"pfs": {"repo": "nowhere", "name": "in", "glob": "/*"}})
    missing = invoke(shared, "list", "datum", "-f", spec)
    assert missing.exit_code == 1
    assert "input in: repo nowhere does not exist" in " ".join(missing.stderr.split())
    for args in ([], ["p@j", "-f", spec]):
        both = invoke(shared, "list", "datum", *args)
        assert both.exit_code == 1 and "give either PIPELINE@JOB or --file SPEC" in both.stderr
