"""`datumflow render pipeline` and `datumflow controller`, through the command line.

No cluster runs here. Rendered output is validated against the Kubernetes and KEDA schemas (helpers
from test_render.py). The controller runs against a real nats-server, with the Kubernetes API
recorded: in-process through test_controller.py's recording ApiClient, and as the real command
through a kubeconfig that points at a small HTTP server standing in for the API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import yaml
from typer.testing import CliRunner

from datumflow.broker import subjects
from datumflow.broker.connection import Broker
from datumflow.broker.kv import Records
from datumflow.broker.records import PipelineInfo
from datumflow.cli.deploy_commands import run_controller
from datumflow.cli.main import app
from datumflow.deploy.render import render_pipeline
from datumflow.runtime.embedded import EmbeddedServer
from datumflow.settings import Settings
from datumflow.spec import PipelineSpec
from tests.helpers import eventually
from tests.test_controller import DEPLOYMENTS, NS, SCALEDOBJECTS, RecordingApiClient
from tests.test_controller import make_spec as controller_spec
from tests.test_render import SPECS, validate_builtin, validate_scaledobject
from tests.test_render import scaledobject_schema as scaledobject_schema  # the fixture

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def spec_file(tmp_path: Path, name: str, **fields: Any) -> Path:
    doc = {
        "pipeline": {"name": name},
        "input": {"pfs": {"repo": "images", "glob": "/*"}},
        "transform": {"cmd": ["python3", "/run.py"]},
        **fields,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def render_cli(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Any:
    base = {k: "" for k in os.environ if k.startswith("DATUMFLOW_")}
    return runner.invoke(app, ["render", "pipeline", *args], env=base | (env or {}), input=input)


# --- render --------------------------------------------------------------------------------------


def test_render_prints_objects_that_validate(
    tmp_path: Path, scaledobject_schema: dict[str, Any]
) -> None:
    path = spec_file(
        tmp_path,
        "edges",
        parallelism_spec={"coefficient": 0.5},
        autoscaling=True,
        datum_timeout="2m",
        resource_requests={"cpu": 0.5, "memory": "1Gi"},
    )
    result = render_cli("-f", str(path), "-n", "team-a", "--image", "reg/edges:1", "--nodes", "6")
    assert result.exit_code == 0, result.output
    objects = list(yaml.safe_load_all(result.stdout))
    assert [o["kind"] for o in objects] == ["Deployment", "ScaledObject"]
    validate_builtin(objects[0])
    validate_scaledobject(objects[1], scaledobject_schema)
    # The command prints exactly what the controller would apply.
    spec = controller_spec(
        "edges",
        parallelism_spec={"coefficient": 0.5},
        autoscaling=True,
        datum_timeout="2m",
        resource_requests={"cpu": 0.5, "memory": "1Gi"},
    )
    assert objects == render_pipeline(spec, namespace="team-a", image="reg/edges:1", nodes=6)
    assert objects[0]["metadata"]["namespace"] == "team-a"
    assert objects[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "reg/edges:1"
    assert (objects[1]["spec"]["minReplicaCount"], objects[1]["spec"]["maxReplicaCount"]) == (0, 3)


@pytest.mark.parametrize("case", list(SPECS))
def test_render_every_kind_of_spec_from_stdin(
    case: str, scaledobject_schema: dict[str, Any]
) -> None:
    spec = SPECS[case]
    document = json.dumps(
        {
            "pipeline": {"name": spec.name},
            "input": {"pfs": {"repo": "images", "glob": "/*"}},
            "transform": {
                "cmd": spec.transform.cmd,
                **({"image": spec.transform.image} if spec.transform.image else {}),
            },
            "parallelism_spec": {
                k: v
                for k, v in (
                    ("constant", spec.parallelism_spec.constant),
                    ("coefficient", spec.parallelism_spec.coefficient),
                )
                if v
            },
            "autoscaling": spec.autoscaling,
            "standby": spec.standby,
        }
    )
    result = render_cli("-f", "-", input=document)
    assert result.exit_code == 0, result.output
    deployment, scaled = yaml.safe_load_all(result.stdout)
    validate_builtin(deployment)
    validate_scaledobject(scaled, scaledobject_schema)


def test_render_monitor_endpoint_and_trigger_authentication(tmp_path: Path) -> None:
    path = spec_file(tmp_path, "edges")
    plain = render_cli("-f", str(path), env={"DATUMFLOW_MONITOR_URL": "nats.infra.svc:8222"})
    assert plain.exit_code == 0, plain.output
    trigger = list(yaml.safe_load_all(plain.stdout))[1]["spec"]["triggers"][0]
    assert trigger["metadata"]["natsServerMonitoringEndpoint"] == "nats.infra.svc:8222"
    assert "authenticationRef" not in trigger

    flagged = render_cli(
        "-f",
        str(path),
        "--monitor-endpoint",
        "https://nats.other.svc:8222",
        "--trigger-authentication",
        "datumflow-nats-monitoring",
    )
    trigger = list(yaml.safe_load_all(flagged.stdout))[1]["spec"]["triggers"][0]
    assert trigger["metadata"]["natsServerMonitoringEndpoint"] == "nats.other.svc:8222"
    assert trigger["metadata"]["useHttps"] == "true"
    assert trigger["authenticationRef"] == {"name": "datumflow-nats-monitoring"}

    default = render_cli("-f", str(path))
    trigger = list(yaml.safe_load_all(default.stdout))[1]["spec"]["triggers"][0]
    assert trigger["metadata"]["natsServerMonitoringEndpoint"] == "nats.datumflow.svc:8222"


@pytest.mark.parametrize(
    ("fields", "args", "message"),
    [
        ({"resource_limits": {"memory": "lots"}}, [], "resource_limits.memory"),
        ({"scaling": {"lag_threshold": 0}}, [], "scaling.lag_threshold"),
        ({"input": {"pfs": {"repo": "images", "glob": "/[a-"}}}, [], "glob"),
        ({}, ["--monitor-endpoint", "ftp://x:1"], "monitor endpoint"),
        ({}, ["--nodes", "0"], "--nodes"),
    ],
)
def test_render_errors_name_the_problem(
    tmp_path: Path, fields: dict[str, Any], args: list[str], message: str
) -> None:
    result = render_cli("-f", str(spec_file(tmp_path, "edges", **fields)), *args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_render_missing_file(tmp_path: Path) -> None:
    result = render_cli("-f", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 1
    assert "nope.yaml" in result.output


# --- the controller's watch, in process ----------------------------------------------------------


def info(spec: PipelineSpec, version: int = 1) -> PipelineInfo:
    now = time.time()
    return PipelineInfo(
        name=spec.name, version=version, spec=spec, salt="salt", created=now, updated=now
    )


def pipelines(broker: Broker) -> Records:
    return Records(broker, bucket=subjects.PIPELINES_BUCKET, type=PipelineInfo)


def requests(api: RecordingApiClient) -> list[tuple[str, str]]:
    return [(c.method, c.path) for c in api.calls if c.method != "GET"]


@contextlib.asynccontextmanager
async def running_controller(
    server: EmbeddedServer, api: RecordingApiClient, **options: Any
) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_controller(
            settings=Settings(nats_url=server.url),
            api_client=api,
            stop=stop,
            namespace=NS,
            image="df:test",
            node_check_interval=3600,
            **options,
        )
    )
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


@pytest.mark.asyncio
async def test_controller_follows_the_pipelines_bucket(
    nats_server: EmbeddedServer, broker: Broker
) -> None:
    api = RecordingApiClient()
    records = pipelines(broker)
    edges = controller_spec("edges", parallelism_spec={"constant": 2})
    # A pipeline that exists before the controller starts is applied at start.
    await records.create("edges", info(edges))
    async with running_controller(nats_server, api):

        async def seen(*expected: tuple[str, str]) -> bool:
            return requests(api)[-len(expected) :] == list(expected)

        await eventually(
            lambda: seen(
                ("PATCH", f"{DEPLOYMENTS}/df-worker-edges"),
                ("PATCH", f"{SCALEDOBJECTS}/df-worker-edges"),
            ),
            timeout=15,
            what="edges applied",
        )
        # Created, updated, deleted while it runs.
        montage = controller_spec("montage", autoscaling=True)
        await records.create("montage", info(montage))
        await eventually(
            lambda: seen(("PATCH", f"{SCALEDOBJECTS}/df-worker-montage")),
            timeout=15,
            what="montage applied",
        )
        wider = controller_spec("edges", parallelism_spec={"constant": 5})
        await records.put("edges", info(wider, version=2))
        await eventually(
            lambda: seen(("PATCH", f"{SCALEDOBJECTS}/df-worker-edges")),
            timeout=15,
            what="edges re-applied",
        )
        scaled = api.calls[-1].body
        assert scaled["spec"]["maxReplicaCount"] == 5
        await records.delete("montage")
        await eventually(
            lambda: seen(
                ("DELETE", f"{SCALEDOBJECTS}/df-worker-montage"),
                ("DELETE", f"{DEPLOYMENTS}/df-worker-montage"),
            ),
            timeout=15,
            what="montage deleted",
        )
    # Each change once: the watch does not re-apply what did not change.
    assert requests(api).count(("PATCH", f"{DEPLOYMENTS}/df-worker-edges")) == 2
    assert requests(api).count(("PATCH", f"{DEPLOYMENTS}/df-worker-montage")) == 1


@pytest.mark.asyncio
async def test_controller_survives_a_broker_restart(
    nats_server: EmbeddedServer, broker: Broker
) -> None:
    api = RecordingApiClient()
    records = pipelines(broker)
    await records.create("edges", info(controller_spec("edges")))
    async with running_controller(nats_server, api, resync_interval=1.0) as task:
        await eventually(
            lambda: ("PATCH", f"{SCALEDOBJECTS}/df-worker-edges") in requests(api),
            timeout=15,
            what="edges applied",
        )
        nats_server.stop()
        nats_server.start()
        await nats_server.wait_ready()
        await eventually(lambda: _reachable(records), timeout=30, what="broker back")
        await records.create("after", info(controller_spec("after")))
        await records.delete("edges")
        await eventually(
            lambda: (
                ("PATCH", f"{SCALEDOBJECTS}/df-worker-after") in requests(api)
                and ("DELETE", f"{DEPLOYMENTS}/df-worker-edges") in requests(api)
            ),
            timeout=30,
            what="changes made after the restart applied",
        )
        assert not task.done()


async def _reachable(records: Records) -> bool:
    try:
        await records.keys()
    except Exception:
        return False
    return True


# --- `datumflow controller`, the real command ----------------------------------------------------


@dataclass
class ApiRequest:
    method: str
    path: str
    query: dict[str, str]
    body: Any


class FakeApiServer:
    """Just enough of a Kubernetes API server for the controller, over HTTP, recording requests."""

    def __init__(self) -> None:
        self.requests: list[ApiRequest] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                outer.requests.append(
                    ApiRequest(self.command, parts.path, dict(parse_qsl(parts.query)), body)
                )
                if self.command == "GET" and parts.path == "/api/v1/nodes":
                    nodes = [
                        {
                            "metadata": {"name": f"node-{i}"},
                            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
                        }
                        for i in range(4)
                    ]
                    answer: Any = {"kind": "NodeList", "metadata": {}, "items": nodes}
                elif self.command == "PATCH":
                    answer = body
                else:
                    answer = {"kind": "Status", "status": "Success"}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "t0ken"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config))
        return path


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def controller_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATUMFLOW_", "KUBERNETES_", "POD_"))
    }
    env.update(DATUMFLOW_HOME=str(tmp_path / "home"), KUBECONFIG=str(tmp_path / "none"))
    env.update(extra)
    return env


def start_controller(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "datumflow.cli.main", "controller"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


@pytest.mark.asyncio
async def test_controller_command_applies_and_deletes(
    tmp_path: Path, nats_server: EmbeddedServer, broker: Broker, api_server: FakeApiServer
) -> None:
    env = controller_env(
        tmp_path,
        KUBECONFIG=str(api_server.kubeconfig(tmp_path / "kubeconfig")),
        DATUMFLOW_NATS_URL=nats_server.url,
        DATUMFLOW_MONITOR_URL="nats.team-a.svc:8222",
        POD_NAMESPACE="team-a",
        DATUMFLOW_WORKER_IMAGE="registry.example.com/datumflow:7",
        DATUMFLOW_TRIGGER_AUTHENTICATION="datumflow-nats-monitoring",
    )
    log = tmp_path / "controller.log"
    proc = start_controller(env, log)
    try:
        records = pipelines(broker)
        spec = controller_spec("montage", parallelism_spec={"coefficient": 0.5}, autoscaling=True)
        await records.create("montage", info(spec))
        base = "/apis/keda.sh/v1alpha1/namespaces/team-a/scaledobjects"

        def applied() -> ApiRequest | None:
            return next(
                (
                    r
                    for r in api_server.requests
                    if (r.method, r.path) == ("PATCH", f"{base}/df-worker-montage")
                ),
                None,
            )

        scaled = await eventually(lambda: applied(), timeout=30, what=f"an apply; log: {log}")
        assert scaled.query == {"fieldManager": "datumflow", "force": "true"}
        # The settings reached the objects: namespace, image, endpoint, TriggerAuthentication,
        # and 4 nodes x 0.5.
        trigger = scaled.body["spec"]["triggers"][0]
        assert trigger["metadata"]["natsServerMonitoringEndpoint"] == "nats.team-a.svc:8222"
        assert trigger["authenticationRef"] == {"name": "datumflow-nats-monitoring"}
        assert scaled.body["spec"]["maxReplicaCount"] == 2
        [deployment] = [
            r
            for r in api_server.requests
            if r.method == "PATCH" and r.path.startswith("/apis/apps/v1/namespaces/team-a/")
        ]
        container = deployment.body["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "registry.example.com/datumflow:7"

        await records.delete("montage")
        await eventually(
            lambda: any(
                r.method == "DELETE"
                and r.path == "/apis/apps/v1/namespaces/team-a/deployments/df-worker-montage"
                for r in api_server.requests
            ),
            timeout=30,
            what="a delete",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()


def test_controller_command_without_credentials(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "datumflow.cli.main", "controller"],
        env=controller_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no Kubernetes credentials" in result.stderr
    assert "Traceback" not in result.stderr
