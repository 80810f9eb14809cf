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


# -- every setting in one place ----------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_settings_from_the_environment_outside_the_datumflow_prefix() -> None:
    settings = Settings.from_env(
        {
            "POD_NAME": "edges-worker-7",
            "POD_NAMESPACE": "team-a",
            "DATUMFLOW_BUSY_FILE": "/run/busy",
            "DATUMFLOW_NATS_SERVER": "/opt/nats-server",
            "DATUMFLOW_INGEST_WINDOW": "0.5",
            "DATUMFLOW_INGEST_SUBJECTS": "minio.events,other.>",
            "AWS_ENDPOINT_URL": "http://general:9000",
            "AWS_ENDPOINT_URL_S3": "http://s3-only:9000",
        }
    )
    assert (settings.pod_name, settings.pod_namespace) == ("edges-worker-7", "team-a")
    assert settings.busy_file == "/run/busy" and settings.nats_server == "/opt/nats-server"
    assert settings.ingest_window == 0.5 and settings.ingest_subjects == "minio.events,other.>"
    # AWS's S3-specific variable before its general one; datumflow's own before both.
    assert settings.s3_endpoint == "http://s3-only:9000"
    assert Settings.from_env({"AWS_ENDPOINT_URL": "http://g:1"}).s3_endpoint == "http://g:1"
    both = {"AWS_ENDPOINT_URL": "http://g:1", "DATUMFLOW_S3_ENDPOINT": "http://mine:2"}
    assert Settings.from_env(both).s3_endpoint == "http://mine:2"
    with pytest.raises(ValueError, match="DATUMFLOW_INGEST_WINDOW"):
        Settings.from_env({"DATUMFLOW_INGEST_WINDOW": "soon"})


def test_children_get_the_settings_under_the_names_they_read() -> None:
    settings = Settings(pod_namespace="team-a", busy_file="/run/busy", s3_endpoint="http://m:1")
    env = settings.secret_env()
    assert env["POD_NAMESPACE"] == "team-a" and env["DATUMFLOW_BUSY_FILE"] == "/run/busy"
    assert Settings.from_env(env) == settings


def test_every_setting_is_documented_with_its_variable() -> None:
    import msgspec

    from datumflow.settings import env_names

    doc = (REPO / "docs" / "settings.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    for field in msgspec.structs.fields(Settings):
        row = next((r for r in rows if r.startswith(f"| `{field.name}`")), None)
        assert row is not None, f"docs/settings.md has no row for {field.name}"
        for name in env_names(field.name):
            assert f"`{name}`" in row, f"docs/settings.md: {field.name} does not name {name}"
    assert "docs/settings.md" in (REPO / "README.md").read_text()


# The batching client runs inside user code, not in a datumflow process: it has no Settings, and
# the one variable it reads is the worker's hand-off of its socket, not a setting.
NOT_SETTINGS = {"settings.py", "batching.py"}


def test_no_module_reads_a_setting_from_the_environment_but_settings() -> None:
    # Copying the environment for a child process (environ.items()) is not reading a setting.
    reads = ("environ.get(", "getenv(", "environ[")
    offenders = [
        f"{path.relative_to(REPO)}: {line.strip()}"
        for path in (REPO / "datumflow").rglob("*.py")
        if path.relative_to(REPO / "datumflow").as_posix() not in NOT_SETTINGS
        for line in path.read_text().splitlines()
        if any(r in line for r in reads)
    ]
    assert not offenders, offenders


def test_up_refuses_a_nats_server_setting_that_names_no_executable(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-nats-server")
    result = datumflow("--home", str(tmp_path / "home"), "up", DATUMFLOW_NATS_SERVER=missing)
    assert result.returncode == 1
    assert f"DATUMFLOW_NATS_SERVER={missing!r} is not an executable" in result.stderr
    assert "Traceback" not in result.stderr
