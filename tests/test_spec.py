"""Pipeline specs: Pachyderm's fields and defaults, both key styles, errors that name the field."""

from __future__ import annotations

import pytest

from datumflow.errors import SpecError
from datumflow.settings import Settings
from datumflow.spec import load_spec, parse_duration

BASE = '{"pipeline": {"name": "edges"}, "input": {"pfs": {"repo": "images", "glob": "/*"}}, "transform": {"cmd": ["true"]}}'


def test_defaults_follow_pachyderm() -> None:
    spec = load_spec(BASE)
    assert spec.input.pfs is not None
    assert (spec.input.pfs.branch, spec.input.pfs.name) == ("master", "")
    assert (spec.datum_tries, spec.output_branch, spec.reprocess_spec) == (
        3,
        "master",
        "until_success",
    )
    assert spec.parallelism_spec.constant == 0 and not spec.autoscaled


def test_yaml_and_camel_case_are_accepted_and_env_names_kept() -> None:
    spec = load_spec(
        """
pipeline: {name: edges}
input:
  cross:
    - pfs: {repo: images, glob: "/*", joinOn: "$1"}
    - pfs: {repo: masks, glob: "/(*)", outerJoin: true}
transform:
  cmd: [python3, edges.py]
  acceptReturnCode: [1]
  env: {myVar: x, OTHER_VAR: y}
parallelismSpec: {constant: 4}
datumTries: 1
datumTimeout: 1m30s
standby: true
"""
    )
    assert spec.transform.accept_return_code == [1]
    assert spec.transform.env == {"myVar": "x", "OTHER_VAR": "y"}
    assert spec.parallelism_spec.constant == 4 and spec.datum_tries == 1
    assert spec.autoscaled  # the 1.x `standby` means autoscaling
    assert parse_duration(spec.datum_timeout, field="datum_timeout") == 90.0
    assert spec.input.cross is not None and spec.input.cross[1].pfs is not None
    assert spec.input.cross[1].pfs.outer_join


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            '"input": {"pfs": {"repo": "images", "glob": "/*", "globb": 1}}',
            "input.pfs: Object contains unknown field `globb`",
        ),
        ('"input": {"pfs": {"repo": "images"}}', "input.pfs: Object missing required field `glob`"),
        ('"input": {}', "input: set exactly one of pfs, cross, union, join, group (found: none)"),
        (
            '"input": {"pfs": {"repo": "a", "glob": "/"}, "union": [{"pfs": {"repo": "b", "glob": "/"}}]}',
            "found: pfs, union",
        ),
        ('"input": {"cross": []}', "input.cross: needs at least one input"),
        ('"input": {"pfs": {"repo": "no good", "glob": "/"}}', "input.pfs.repo"),
        ('"transform": {}', "transform.cmd: required"),
        ('"datum_tries": 0', "datum_tries: must be >= 1"),
        ('"datum_timeout": "soon"', "datum_timeout: 'soon' is not a duration"),
        (
            '"parallelism_spec": {"constant": 2, "coefficient": 0.5}',
            "set exactly one of constant and coefficient",
        ),
        ('"parallelism_spec": {"constant": "two"}', "parallelism_spec.constant: Expected `int`"),
        ('"reprocess_spec": "sometimes"', "reprocess_spec"),
        ('"pipeline": {"name": "-bad"}', "pipeline.name"),
    ],
)
def test_errors_name_the_field(change: str, message: str) -> None:
    key = change.split(":", 1)[0]
    import json

    doc = json.loads(BASE)
    doc.update(json.loads("{" + change + "}"))
    assert key.strip('"') in doc
    with pytest.raises(SpecError) as info:
        load_spec(json.dumps(doc), source="edges.json")
    assert message in str(info.value)
    assert str(info.value).startswith("edges.json: ")


def test_garbage_is_not_a_spec() -> None:
    with pytest.raises(SpecError, match="a pipeline spec is a mapping"):
        load_spec("- just\n- a list\n")
    with pytest.raises(SpecError, match="neither valid JSON nor valid YAML"):
        load_spec("{: [")


def test_settings_come_from_the_environment_only_when_asked() -> None:
    settings = Settings.from_env(
        {"DATUMFLOW_ACK_WAIT": "2.5", "DATUMFLOW_HOME": "/tmp/x"}, home="/tmp/y"
    )
    assert settings.ack_wait == 2.5 and settings.home == "/tmp/y"
    with pytest.raises(ValueError, match="bad datumflow setting"):
        Settings.from_env({"DATUMFLOW_ACK_WAIT": "soon"})
