"""Security: every way to authenticate to NATS, `datumflow up --secure`, credentials kept from user
code, and secrets kept out of logs, records and `inspect` output.

Every end-to-end case runs real processes: a real nats-server configured for the kind of
authentication, `datumflow up` with every function, the CLI as a user types it, and a pipeline whose
user code dumps its environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest

from datumflow.broker.connection import connect, redact
from datumflow.errors import BrokerError
from datumflow.functions.worker import sandbox
from datumflow.runtime import secure
from datumflow.runtime.embedded import EmbeddedServer, read_instance
from datumflow.settings import Settings
from tests.helpers import Cluster, cluster_env, create_pipeline
from tests.pki import make_pki, new_nkey, operator_setup

ENV_DUMP = {
    "pipeline": {"name": "envdump"},
    "input": {"pfs": {"repo": "src", "name": "in", "glob": "/*"}},
    "transform": {
        "cmd": [
            "sh",
            "-c",
            '{ env; echo "RUNNING_AS=$(id -u)"; } | sort > "/pfs/out/env-$(basename /pfs/in/*)"',
        ],
        "env": {"SHOWN": "user-set-variable"},
    },
}
# Variables a careless datumflow would hand to user code: the store's and the broker's.
PLANTED = {
    "AWS_ACCESS_KEY_ID": "AKIAPLANTEDKEYID0001",
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-0123456789",
    "NATS_PASSWORD": "planted-nats-env-secret",
}


def run_pipeline(cli, tmp_path: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Through the CLI: a repo, two files, the env-dumping pipeline, its output (each command a
    process that connects on its own). Returns the environment the user code saw, per datum."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "a.txt").write_text("a\n")
    (data / "b.txt").write_text("b\n")
    spec = tmp_path / "envdump.json"
    spec.write_text(json.dumps(ENV_DUMP))
    cli("create", "repo", "src")
    cli("put", "file", "src@master:/", "-f", str(data), "-r")
    cli("create", "pipeline", "-f", str(spec))
    cli("wait", "commit", "src@master", "--timeout", "90")
    return {
        name: cli("get", "file", f"envdump@master:/env-{name}").stdout
        for name in ("a.txt", "b.txt")
    }


def assert_clean_environment(dumps: dict[str, str], secrets: list[str]) -> None:
    assert set(dumps) == {"a.txt", "b.txt"}
    for name, text in dumps.items():
        names = [line.split("=", 1)[0] for line in text.splitlines() if "=" in line]
        assert "SHOWN" in names, f"the dump of {name} is not an environment dump: {text[:200]}"
        leaked = [n for n in names if n.startswith(("DATUMFLOW_", "AWS_", "NATS_"))]
        assert not leaked, f"user code saw {leaked}"
        for value in secrets:
            assert value not in text, "a secret reached user code"


def grep_tree(root: Path, secrets: list[str], *, skip: tuple[Path, ...] = ()) -> list[str]:
    """Files under `root` holding any of the secrets, as bytes anywhere in them."""
    found = []
    for path in root.rglob("*"):
        if not path.is_file() or any(path.is_relative_to(s) for s in skip):
            continue
        data = path.read_bytes()
        found += [f"{path}: {s[:6]}..." for s in secrets if s.encode() in data]
    return found


def cli_outputs(cli) -> str:  # type: ignore[no-untyped-def]
    """Everything the read-only commands print about the pipeline, its jobs, repos and commits."""
    jobs = json.loads(cli("list", "job", "--json").stdout)
    out = [
        json.dumps(jobs),
        cli("list", "pipeline", "--json").stdout,
        cli("inspect", "pipeline", "envdump").stdout,
        cli("inspect", "commit", "envdump@master", "--json").stdout,
    ]
    for job in jobs:
        out.append(cli("inspect", "job", f"{job['pipeline']}@{job['id']}").stdout)
    return "\n".join(out)


# -- datumflow up --secure -----------------------------------------------------------------------


@pytest.fixture
def secure_up(tmp_path: Path) -> Iterator[Cluster]:
    """`datumflow up --secure` with its own embedded broker, as a user starts it, given the planted
    secrets; the CLI is run as a user types it, with no flags and without those secrets."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
    env.update(PLANTED, DATUMFLOW_HOME=str(home), DATUMFLOW_ACK_WAIT="3")
    up = Cluster(
        home=home,
        env=env,
        up_args=("--secure",),
        home_flag=False,
        cli_env={k: v for k, v in env.items() if k not in PLANTED},
    )
    try:
        up.start()
        yield up
    finally:
        up.stop()


def test_up_secure_runs_a_pipeline_and_keeps_every_secret(
    secure_up: Cluster, tmp_path: Path
) -> None:
    home = secure_up.home
    made = secure.load(home)
    assert made is not None and made.password
    # The credentials and keys are the owner's alone.
    assert stat.S_IMODE((home / "secure").stat().st_mode) == 0o700
    for path in (home / "secure").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # The server's own config names the secure file and does not hold the password.
    assert made.password not in (home / "nats" / "nats-server.conf").read_text()

    # The CLI finds the broker, its password and its CA with no flags.
    dumps = run_pipeline(secure_up.cli, tmp_path)
    secrets = [made.password, *PLANTED.values()]
    assert_clean_environment(dumps, secrets)
    if os.geteuid() == 0:
        # A secured datumflow run as root runs user code as nobody.
        nobody = pwd.getpwnam("nobody").pw_uid
        assert all(f"RUNNING_AS={nobody}\n" in dump for dump in dumps.values()), dumps

    printed = cli_outputs(secure_up.cli)
    assert "envdump" in printed
    assert not [s for s in secrets[:1] if s in printed], "the broker password was printed"
    # Logs, job and commit records, KV buckets and streams on disk, objects: the password and
    # the store's keys are nowhere but in the secure directory.
    found = grep_tree(home, secrets, skip=(home / "secure",))
    assert not found, found


@pytest.mark.asyncio
async def test_up_secure_rejects_clients_without_the_password_or_tls(secure_up: Cluster) -> None:
    made = secure.load(secure_up.home)
    instance = read_instance(secure_up.home)
    assert made is not None and instance is not None
    assert instance.secure, "instance.json must say the broker it names is secured"
    url = instance.nats_url

    # A plain client: the server wants TLS and a password.
    with pytest.raises((nats.errors.Error, OSError)):
        await nats.connect(url, allow_reconnect=False, connect_timeout=3)

    attempts = {
        "TLS but no password": Settings(nats_url=url, nats_tls_ca=made.ca),
        "TLS and a wrong password": Settings(
            nats_url=url, nats_tls_ca=made.ca, nats_user=made.user, nats_password="guess"
        ),
    }
    for what, settings in attempts.items():
        with pytest.raises(BrokerError, match="refused our credentials") as refused:
            await connect(settings=settings, name="intruder", reconnect=False)
        assert made.password not in str(refused.value), what

    with pytest.raises(BrokerError, match=r"requires TLS|TLS failed"):
        await connect(
            settings=Settings(nats_url=url, nats_user=made.user, nats_password=made.password),
            name="no-tls",
            reconnect=False,
        )
    # A certificate authority other than the state directory's own is not trusted.
    other = make_pki(secure_up.home.parent / "other-ca")
    with pytest.raises(BrokerError, match=r"TLS failed|CERTIFICATE_VERIFY_FAILED"):
        await connect(
            settings=Settings(
                nats_url=url,
                nats_user=made.user,
                nats_password=made.password,
                nats_tls_ca=other.ca,
            ),
            name="wrong-ca",
            reconnect=False,
        )

    broker = await connect(settings=secure.apply(Settings(nats_url=url), made), name="friend")
    await broker.close()


def test_secure_refuses_an_external_broker(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
    env.update(DATUMFLOW_HOME=str(tmp_path / "home"), DATUMFLOW_NATS_URL="nats://127.0.0.1:1")
    result = subprocess.run(
        [sys.executable, "-m", "datumflow.cli.main", "up", "--secure"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "--secure secures the embedded broker" in result.stderr


def test_secure_credentials_are_made_once_and_kept(tmp_path: Path) -> None:
    first = secure.ensure(tmp_path)
    again = secure.ensure(tmp_path)
    assert first == again
    assert len(first.password) >= 32
    applied = secure.apply(Settings(nats_url="nats://x"), first)
    assert (applied.nats_user, applied.nats_password, applied.nats_tls_ca) == (
        first.user,
        first.password,
        first.ca,
    )
    # Credentials the user names win over the state directory's.
    token = secure.apply(Settings(nats_url="nats://x", nats_token="mine"), first)
    assert token.nats_password == "" and token.nats_token == "mine"


# -- every kind of authentication, every function and the CLI ------------------------------------


def _auth_case(kind: str, tmp_path: Path) -> tuple[str, dict[str, str], list[str]]:
    """(server config, DATUMFLOW_* settings, secrets) for one kind of authentication."""
    if kind == "token":
        token = "tok-" + os.urandom(12).hex()
        return (
            f"authorization {{ token: {json.dumps(token)} }}",
            {"DATUMFLOW_NATS_TOKEN": token},
            [token],
        )
    if kind == "nkey-mutual-tls":
        pki = make_pki(tmp_path / "pki")
        user = new_nkey("user")
        seed = user.seed.decode()
        config = "\n".join(
            [
                f"authorization {{ users = [ {{ nkey: {user.public_key.decode()} }} ] }}",
                f"tls {{ cert_file: {json.dumps(pki.server_cert)}, key_file:"
                f" {json.dumps(pki.server_key)}, ca_file: {json.dumps(pki.ca)}, verify: true }}",
            ]
        )
        env = {
            "DATUMFLOW_NATS_NKEY_SEED": seed,
            "DATUMFLOW_NATS_TLS_CA": pki.ca,
            "DATUMFLOW_NATS_TLS_CERT": pki.client_cert,
            "DATUMFLOW_NATS_TLS_KEY": pki.client_key,
        }
        return config, env, [seed]
    if kind == "creds-file":
        config, creds = operator_setup(tmp_path)
        seed = next(line for line in Path(creds).read_text().splitlines() if line.startswith("SU"))
        return config, {"DATUMFLOW_NATS_CREDS": creds}, [seed]
    raise AssertionError(kind)


# User and password over TLS: `up --secure` above, with the embedded broker.
@pytest.mark.parametrize("kind", ["token", "nkey-mutual-tls", "creds-file"])
def test_every_function_and_the_cli_authenticate(kind: str, tmp_path: Path) -> None:
    config, auth, secrets = _auth_case(kind, tmp_path)
    server = EmbeddedServer(
        store_dir=tmp_path / "nats", extra_config=config, log_file=tmp_path / "nats-server.log"
    )
    server.start()
    cluster: Cluster | None = None
    try:
        asyncio.run(server.wait_ready())
        # Without the credentials the broker turns us away, with a message that says why.
        with pytest.raises(BrokerError, match=r"refused our credentials|requires TLS|TLS failed"):
            asyncio.run(
                connect(settings=Settings(nats_url=server.url), name="anon", reconnect=False)
            )
        home = tmp_path / "home"
        env = cluster_env(home, server, **auth, **PLANTED)
        cluster = Cluster(home=home, server=server, env=env)
        cluster.start()
        dumps = run_pipeline(lambda *a: cluster.cli(*a), tmp_path)
        assert_clean_environment(dumps, secrets + list(PLANTED.values()))
        printed = cluster.cli("list", "job", "--json").stdout
        assert json.loads(printed)[0]["state"] == "success"
        assert not [s for s in secrets if s in printed]
        store = tmp_path / "nats"  # the broker's streams and KV buckets, on disk
        found = grep_tree(home, secrets) + grep_tree(
            store, secrets, skip=(store / "nats-server.conf",)
        )
        assert not found, found
    finally:
        if cluster is not None:
            cluster.stop()
        server.stop()


# -- the pieces ---------------------------------------------------------------------------------


def test_user_environment_drops_the_broker_and_store_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    planted = {
        "DATUMFLOW_NATS_PASSWORD": "p",
        "DATUMFLOW_NATS_TOKEN": "t",
        "DATUMFLOW_STORAGE": "s3://bucket",
        "AWS_SECRET_ACCESS_KEY": "k",
        "AWS_SESSION_TOKEN": "s",
        "NATS_URL": "nats://x",
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
        "KEEP_ME": "yes",
    }
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    env = sandbox.user_environment({"PACH_JOB_ID": "j"})
    assert env["KEEP_ME"] == "yes" and env["PACH_JOB_ID"] == "j"
    assert not [k for k in env if k in planted and k != "KEEP_ME"]


def test_settings_never_show_their_secrets() -> None:
    settings = Settings(
        nats_url="nats://broker:4222",
        nats_user="df",
        nats_password="hunter2-password",
        nats_token="hunter2-token",
        nats_nkey_seed="SUAHUNTER2SEED",
    )
    for text in (repr(settings), str(settings), f"{settings}"):
        assert "hunter2" not in text and "***" in text and "nats://broker:4222" in text


@pytest.mark.asyncio
async def test_connect_errors_name_the_problem_not_the_secret(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert redact("nats://df:s3cret@host:4222") == "nats://***@host:4222"
    closed = "nats://df:s3cret@127.0.0.1:1"
    with pytest.raises(BrokerError) as unreachable:
        await connect(settings=Settings(nats_url=closed), name="t", reconnect=False)
    assert "s3cret" not in str(unreachable.value) and "***@127.0.0.1:1" in str(unreachable.value)

    with pytest.raises(BrokerError, match=r"DATUMFLOW_NATS_CREDS names .* not a readable file"):
        await connect(
            settings=Settings(nats_url=nats_server.url, nats_creds="/nonexistent.creds"), name="t"
        )
    with pytest.raises(BrokerError, match="neither a user seed"):
        await connect(
            settings=Settings(nats_url=nats_server.url, nats_nkey_seed="not-a-seed"), name="t"
        )
    with pytest.raises(BrokerError, match="cannot load the broker TLS files"):
        await connect(
            settings=Settings(nats_url=nats_server.url, nats_tls_ca="/nonexistent-ca.pem"),
            name="t",
        )
    # Without the nkeys package, NKEY and creds authentication say what to install.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nkeys" else real(name, *a)
    )
    with pytest.raises(BrokerError, match=r"pip install 'nats-py\[nkeys\]'"):
        await connect(
            settings=Settings(nats_url=nats_server.url, nats_nkey_seed="SUAXXXX"), name="t"
        )


def test_nkey_seed_may_be_a_file(tmp_path: Path) -> None:
    user = new_nkey("user")
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(user.seed)
    server = EmbeddedServer(
        store_dir=tmp_path / "nats",
        extra_config=f"authorization {{ users = [ {{ nkey: {user.public_key.decode()} }} ] }}",
    )
    server.start()
    try:

        async def check() -> None:
            await server.wait_ready()
            broker = await connect(
                settings=Settings(nats_url=server.url, nats_nkey_seed=str(seed_file)), name="t"
            )
            await broker.close()

        asyncio.run(check())
    finally:
        server.stop()


def test_secure_home_record_is_plain_json() -> None:
    # The record other tools read: user, password and the paths, nothing else.
    fields = {f.name for f in msgspec.structs.fields(secure.SecureHome)}
    assert fields == {"user", "password", "ca", "cert", "key", "config"}


@pytest.mark.asyncio
async def test_user_code_cannot_read_the_workers_credentials(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("run as root: only then is there another user to run user code as")
    token = "planted-token-" + os.urandom(8).hex()
    # A broker without authorization ignores the token; the worker still holds it. User code
    # runs as nobody (`up --secure` chooses that by itself).
    cluster = make_cluster(DATUMFLOW_NATS_TOKEN=token, DATUMFLOW_USER_CODE_USER="nobody")
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a\n")
    cluster.cli("create", "repo", "src")
    cluster.cli("put", "file", "src@master:/", "-f", str(data), "-r")
    snoop = (
        "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < \"$f\"; done 2>/dev/null"
        " | grep -c '^DATUMFLOW_NATS_TOKEN=' > /pfs/out/readable; true"
    )
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "snoop"},
            "input": {"pfs": {"repo": "src", "glob": "/*"}},
            "transform": {"cmd": ["sh", "-c", snoop]},
        },
    )
    cluster.cli("wait", "commit", "src@master", "--timeout", "60")
    readable = int(cluster.cli("get", "file", "snoop@master:/readable").stdout.strip())
    assert readable == 0, f"user code read the broker token from {readable} processes"


def test_the_user_code_identity_is_checked_when_the_worker_starts() -> None:
    from datumflow.functions.worker.sandbox import user_code_identity

    assert user_code_identity("") is None
    if os.geteuid() != 0:
        assert user_code_identity("nobody") is None  # not root: nothing to switch from
        return
    nobody = pwd.getpwnam("nobody")
    assert user_code_identity("nobody") == (nobody.pw_uid, nobody.pw_gid)
    assert user_code_identity("54321") == (54321, 54321)  # a uid without an entry, as in images
    with pytest.raises(ValueError, match="no user 'no-such-user'"):
        user_code_identity("no-such-user")


def test_up_refuses_an_unknown_user_code_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("run as root: only then is the user looked up")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
    env["DATUMFLOW_USER_CODE_USER"] = "no-such-user"
    result = subprocess.run(
        [sys.executable, "-m", "datumflow.cli.main", "--home", str(tmp_path / "h"), "up"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no user 'no-such-user'" in result.stderr and "DATUMFLOW_USER_CODE_USER" in result.stderr
    assert not (tmp_path / "h" / "instance.json").exists()  # nothing started
