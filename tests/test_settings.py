"""Settings fail closed: a value outside a closed set is refused with the allowed ones named, and
a user to run user code as is never silently replaced by root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from datumflow.broker.connection import Broker
from datumflow.errors import PermanentError
from datumflow.functions.worker.worker import Worker
from datumflow.settings import Settings
from datumflow.storage.file import FileStore

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="user code changes user only as root")


def datumflow(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
    return subprocess.run(
        [sys.executable, "-m", "datumflow.cli.main", *args],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_unknown_pfs_mode_is_refused_naming_it_and_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"'nmespace'.*auto, namespace, direct, env"):
        Settings.from_env({"DATUMFLOW_PFS_MODE": "nmespace"})
    with pytest.raises(ValueError, match=r"'Direct'.*auto, namespace, direct, env"):
        Settings(pfs_mode="Direct")  # type: ignore[arg-type]
    assert Settings.from_env({"DATUMFLOW_PFS_MODE": "direct"}).pfs_mode == "direct"


def test_the_cli_refuses_an_unknown_pfs_mode_before_doing_anything(tmp_path: Path) -> None:
    result = datumflow("--home", str(tmp_path), "list", "repo", DATUMFLOW_PFS_MODE="nmespace")
    assert result.returncode != 0
    assert "nmespace" in result.stderr and "auto, namespace, direct, env" in result.stderr


@as_root
@pytest.mark.asyncio
async def test_a_worker_refuses_to_run_user_code_as_root_when_a_user_was_asked_for(
    broker: Broker, tmp_path: Path
) -> None:
    with pytest.raises(PermanentError, match=r"nobody.*pfs_mode env.*root"):
        Worker(
            broker=broker,
            store=FileStore(tmp_path / "objects"),
            pipeline="p",
            scratch=tmp_path / "scratch",
            ack_wait=30,
            pfs_mode="env",
            user_code_user="nobody",
        )


@as_root
def test_up_refuses_at_once_when_user_code_would_run_as_root(tmp_path: Path) -> None:
    result = datumflow(
        "--home",
        str(tmp_path / "home"),
        "up",
        DATUMFLOW_PFS_MODE="env",
        DATUMFLOW_USER_CODE_USER="nobody",
    )
    assert result.returncode != 0
    assert "nobody" in result.stderr and "pfs_mode env" in result.stderr, result.stderr
    assert not (tmp_path / "home" / "instance.json").exists()
