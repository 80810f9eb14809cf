"""The `datumflow` command loads only what the command it runs needs: a command's start-up time is
mostly imports, and the broker client, the HTTP stack, the S3 client and the Kubernetes client
are each tens of milliseconds or more."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from datumflow.cli.main import COMMANDS

HEAVY = ("nats", "aiohttp", "aiobotocore", "botocore", "kubernetes", "pydantic", "rich", "yaml")
"""pydantic: some typer releases check option values with it (see cli.main.plain_strings); rich
and yaml: for help, tables and specs that a listing does not need."""


def loaded_after(code: str) -> set[str]:
    """The HEAVY packages in sys.modules after running `code` in a fresh interpreter."""
    probe = f"""
import json, sys
try:
{"".join("    " + line + chr(10) for line in code.strip().splitlines())}
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_importing_the_cli_loads_no_client_library() -> None:
    assert loaded_after("import datumflow.cli.main") == set()


@pytest.mark.parametrize("argv", [["--help"], ["list", "--help"], ["create", "--help"]])
def test_help_loads_no_client_library(argv: list[str]) -> None:
    code = f"""
from datumflow.cli.main import app
app({argv!r}, prog_name="datumflow")
"""
    assert loaded_after(code) == set()


def test_a_broker_command_loads_the_broker_client_but_not_http_s3_or_kubernetes(
    tmp_path: Path,
) -> None:
    # No datumflow runs for this home: the command parses its options, loads its module, reads
    # the settings, and stops before connecting.
    code = f"""
from datumflow.cli.main import app
app(["--home", {str(tmp_path)!r}, "list", "repo", "--json"], prog_name="datumflow")
"""
    assert loaded_after(code) == {"nats"}


@pytest.mark.parametrize(
    "argv", [["wait", "job", "p@j"], ["wait", "commit", "r@master"], ["put", "file", "r@master"]]
)
def test_commands_with_a_progress_bar_load_rich_only_to_draw_it(
    tmp_path: Path, argv: list[str]
) -> None:
    # Their modules are loaded, and stop before connecting: rich comes only with a bar.
    local = tmp_path / "f"
    local.write_text("x")
    extra = ["-f", str(local)] if argv[0] == "put" else []
    code = f"""
from datumflow.cli.main import app
app(["--home", {str(tmp_path)!r}, *{argv + extra!r}], prog_name="datumflow")
"""
    # (pydantic may come with `--timeout`, a float option: see cli.main.plain_strings.)
    loaded = loaded_after(code)
    assert "nats" in loaded and "rich" not in loaded, loaded


@pytest.mark.parametrize(
    ("group", "name"), [(g, n) for g, table in COMMANDS.items() for n in table]
)
def test_listed_help_is_the_commands_own(group: str, name: str) -> None:
    lazy = COMMANDS[group][name]
    function = getattr(importlib.import_module(f"datumflow.cli.{lazy.module}"), lazy.function)
    first = (inspect.getdoc(function) or "").split("\n\n")[0].replace("\n", " ")
    assert lazy.help == first, f"datumflow {group} {name}: update COMMANDS in cli/main.py"


@pytest.mark.parametrize(("typed", "meant"), [("lgos", "logs"), ("list rpo", "repo")])
def test_a_typo_of_a_command_not_loaded_yet_is_still_suggested(typed: str, meant: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "datumflow.cli.main", *typed.split()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"Did you mean '{meant}'?" in result.stderr, result.stderr
