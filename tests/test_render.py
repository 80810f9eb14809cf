"""Rendering pipelines for Kubernetes, and the kustomize base: built offline, checked by schema.

Nothing here runs on a cluster. Built-in kinds are validated with kubernetes-validate (Kubernetes 1.32,
strict: unknown fields fail); the ScaledObject with KEDA 2.20.2's own CRD schema (kept in
tests/data, its descriptions stripped), made strict the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from datumflow import scaling
from datumflow.deploy import render
from datumflow.deploy.render import RenderError, render_pipeline, render_yaml
from datumflow.errors import SpecError
from datumflow.runtime.embedded import server_binary
from datumflow.spec import PipelineSpec, load_spec
from tests.helpers import DATA, REPO_ROOT

KEDA_SCHEMA = DATA / "keda-scaledobject-v2.20.2.schema.yaml"
KUBERNETES_VERSION = "1.32"

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def make_spec(name: str = "edges", **fields: Any) -> PipelineSpec:
    doc = {
        "pipeline": {"name": name},
        "input": {"pfs": {"repo": "images", "glob": "/*"}},
        "transform": {"cmd": ["python3", "/edges.py"]},
        **fields,
    }
    return load_spec(json.dumps(doc))


SPECS: dict[str, PipelineSpec] = {
    "constant": make_spec(parallelism_spec={"constant": 4}),
    "coefficient": make_spec("montage", parallelism_spec={"coefficient": 0.5}),
    "autoscaling": make_spec(
        "sparse", parallelism_spec={"constant": 8}, autoscaling=True, datum_timeout="2m"
    ),
    "standby-coefficient": make_spec(
        "old_style", parallelism_spec={"coefficient": 1.5}, standby=True
    ),
    "resources": make_spec(
        "train",
        autoscaling=True,
        transform={"cmd": ["python3", "/train.py"], "image": "registry.example.com/train:3"},
        resource_requests={"cpu": 0.5, "memory": "2Gi", "disk": "5Gi"},
        resource_limits={
            "cpu": 2,
            "memory": "4Gi",
            "disk": "20Gi",
            "gpu": {"type": "nvidia.com/gpu", "number": 1},
        },
        scaling={"lag_threshold": 10, "activation_lag_threshold": 2, "cooldown_period": 600},
    ),
}


# --- schema validation helpers ------------------------------------------------------------------


def validate_builtin(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    meta = obj["metadata"]
    assert DNS_LABEL.match(meta["name"]) and len(meta["name"]) <= 63, meta["name"]
    for value in (meta.get("labels") or {}).values():
        assert LABEL_VALUE.match(value) and len(value) <= 63, value


def _strict(schema: Any) -> Any:
    # The API server prunes fields a structural schema does not name, and rejects them with
    # fieldValidation=Strict: the same as additionalProperties: false where properties are listed.
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def scaledobject_schema() -> dict[str, Any]:
    return _strict(yaml.safe_load(KEDA_SCHEMA.read_text()))


def validate_scaledobject(obj: dict[str, Any], schema: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(schema).validate(obj)
    spec = obj["spec"]
    # The CRD's x-kubernetes-validations rule, which JSON Schema cannot express.
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
    assert DNS_LABEL.match(obj["metadata"]["name"]) and len(obj["metadata"]["name"]) <= 63
    for trigger in spec["triggers"]:
        # KEDA reads metadata as strings; a YAML number here is rejected by the CRD anyway.
        assert all(isinstance(v, str) for v in trigger["metadata"].values())


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


# --- rendering ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(SPECS))
def test_rendered_objects_validate(case: str, scaledobject_schema: dict[str, Any]) -> None:
    objects = render_pipeline(SPECS[case], namespace="datumflow", image="df:test", nodes=5)
    assert [o["kind"] for o in objects] == ["Deployment", "ScaledObject"]
    validate_builtin(objects[0])
    validate_scaledobject(objects[1], scaledobject_schema)


def test_schema_check_catches_mistakes(scaledobject_schema: dict[str, Any]) -> None:
    # The strict schemas must reject what the API server would: otherwise the tests above prove
    # nothing.
    deployment, scaled = render_pipeline(SPECS["constant"], namespace="datumflow")
    deployment["spec"]["template"]["spec"]["containers"][0]["envfrom"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    for broken in (
        {"minReplicaCount": -1},
        {"pollingInterval": 0},
        {"maxReplicas": 3},  # KEDA spells it maxReplicaCount
        {"triggers": []},
    ):
        bad = json.loads(json.dumps(scaled))
        bad["spec"] |= broken
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft7Validator(scaledobject_schema).validate(bad)
    bad = json.loads(json.dumps(scaled))
    bad["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(scaledobject_schema).validate(bad)


def test_worker_deployment() -> None:
    spec = SPECS["autoscaling"]
    deployment = render_pipeline(spec, namespace="pipelines", image="df:test")[0]
    assert deployment["metadata"]["name"] == "df-worker-sparse"
    assert deployment["metadata"]["namespace"] == "pipelines"
    labels = {"app.kubernetes.io/name": "datumflow-worker", "datumflow.io/pipeline": "sparse"}
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert labels.items() <= deployment["metadata"]["labels"].items()
    # KEDA owns the replica count of an autoscaled pipeline.
    assert "replicas" not in deployment["spec"]
    pod = deployment["spec"]["template"]
    assert labels.items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"] == "-100"
    pod_spec = pod["spec"]
    assert pod_spec["serviceAccountName"] == "datumflow-worker"
    # datum_timeout 2m: drain for 120 s, plus the shutdown margin.
    assert pod_spec["terminationGracePeriodSeconds"] == scaling.termination_grace_seconds(120.0)
    assert pod_spec["volumes"] == [{"name": "pfs", "emptyDir": {}}]
    (container,) = pod_spec["containers"]
    assert container["image"] == "df:test"
    assert container["command"] == ["datumflow", "worker", "--pipeline", "sparse"]
    assert container["volumeMounts"] == [{"name": "pfs", "mountPath": "/pfs"}]
    assert container["envFrom"] == [
        {"configMapRef": {"name": "datumflow-settings"}},
        {"secretRef": {"name": "datumflow-secrets", "optional": True}},
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["DATUMFLOW_GRACE"]["value"] == "120"
    assert env["DATUMFLOW_PFS_MODE"]["value"] == "direct"
    assert "resources" not in container


def test_fixed_parallelism_sets_replicas() -> None:
    deployment, scaled = render_pipeline(SPECS["constant"], namespace="datumflow")
    assert deployment["spec"]["replicas"] == 4
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (4, 4)


@pytest.mark.parametrize(
    ("case", "nodes", "bounds"),
    [
        ("constant", 9, (4, 4)),
        ("coefficient", 9, (5, 5)),  # ceil(0.5 * 9)
        ("coefficient", 2, (1, 1)),
        ("autoscaling", 9, (0, 8)),
        ("standby-coefficient", 3, (0, 5)),  # ceil(1.5 * 3), from standby
    ],
)
def test_replica_bounds(case: str, nodes: int, bounds: tuple[int, int]) -> None:
    scaled = render_pipeline(SPECS[case], namespace="datumflow", nodes=nodes)[1]["spec"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == bounds


def test_scaledobject_trigger() -> None:
    scaled = render_pipeline(
        SPECS["resources"], namespace="datumflow", monitor_endpoint="nats.infra.svc:8222"
    )[1]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "df-worker-train",
    }
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "nats-jetstream"
    assert trigger["metadata"] == {
        "natsServerMonitoringEndpoint": "nats.infra.svc:8222",
        "account": "$G",
        "stream": "DF_DATUMS",
        "consumer": "df-worker-train",
        "lagThreshold": "10",
        "activationLagThreshold": "2",
    }
    assert "authenticationRef" not in trigger
    assert spec["cooldownPeriod"] == 600
    assert spec["pollingInterval"] == 5


def test_numbers_come_from_scaling(monkeypatch: pytest.MonkeyPatch) -> None:
    # Change the defaults in datumflow.scaling: the rendered ScaledObject must follow.
    monkeypatch.setattr(scaling, "DEFAULT_LAG_THRESHOLD", 7)
    monkeypatch.setattr(scaling, "DEFAULT_ACTIVATION_LAG_THRESHOLD", 3)
    monkeypatch.setitem(
        scaling._DEFAULTS,
        "kubernetes",
        scaling._Defaults(polling_interval=2.2, cooldown_period=99.5, scale_down_window=44.0),
    )
    spec = SPECS["autoscaling"]
    scaled = render_pipeline(spec, namespace="datumflow")[1]["spec"]
    p = scaling.params_for(spec, nodes=1, place="kubernetes")
    assert scaled["pollingInterval"] == 3  # whole seconds, rounded up
    assert scaled["cooldownPeriod"] == 100
    assert scaled["triggers"][0]["metadata"]["lagThreshold"] == str(p.lag_threshold) == "7"
    assert scaled["triggers"][0]["metadata"]["activationLagThreshold"] == "3"
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 44
    assert behavior["scaleUp"]["policies"][0]["value"] == p.max_replicas


def test_resources() -> None:
    deployment = render_pipeline(SPECS["resources"], namespace="datumflow")[0]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/train:3"  # transform.image
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "2Gi", "ephemeral-storage": "5Gi"},
        "limits": {
            "cpu": "2",
            "memory": "4Gi",
            "ephemeral-storage": "20Gi",
            "nvidia.com/gpu": "1",
        },
    }
    # The disk limit bounds the datum scratch space.
    assert pod["volumes"] == [{"name": "pfs", "emptyDir": {"sizeLimit": "20Gi"}}]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"resource_requests": {"memory": "lots"}}, "resource_requests.memory"),
        ({"resource_limits": {"cpu": "two"}}, "resource_limits.cpu"),
        ({"resource_limits": {"cpu": 0}}, "resource_limits.cpu"),
        ({"resource_limits": {"disk": "10 GB"}}, "resource_limits.disk"),
        ({"resource_limits": {"gpu": {"number": 1}}}, "resource_limits.gpu.type"),
        (
            {"resource_limits": {"gpu": {"type": "nvidia.com/gpu", "number": 0}}},
            "resource_limits.gpu.number",
        ),
        (
            {
                "resource_requests": {"gpu": {"type": "nvidia.com/gpu", "number": 1}},
                "resource_limits": {"gpu": {"type": "nvidia.com/gpu", "number": 2}},
            },
            "resource_requests.gpu",
        ),
        ({"scaling": {"lag_threshold": 0}}, "scaling.lag_threshold"),
    ],
)
def test_bad_spec_fields_are_named(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError, match=re.escape(field)):
        render_pipeline(make_spec(**fields), namespace="datumflow")


def test_gpu_request_alone_becomes_a_limit() -> None:
    spec = make_spec(resource_requests={"gpu": {"type": "nvidia.com/gpu", "number": 2}})
    container = render_pipeline(spec, namespace="datumflow")[0]["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    validate_builtin(render_pipeline(spec, namespace="datumflow")[0])


@pytest.mark.parametrize(
    ("image", "transform_image", "expected"),
    [
        (None, "", render.DEFAULT_IMAGE),
        (None, "user/code:1", "user/code:1"),
        ("override:2", "user/code:1", "override:2"),
        ("override:2", "", "override:2"),
    ],
)
def test_image_choice(image: str | None, transform_image: str, expected: str) -> None:
    spec = make_spec(transform={"cmd": ["true"], "image": transform_image})
    deployment = render_pipeline(spec, namespace="datumflow", image=image)[0]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == expected


@pytest.mark.parametrize(
    "name",
    ["My_Pipeline", "ends-with-dash-", "under_score_", "x" * 63, "A", "a" * 53, "a" * 54],
)
def test_awkward_pipeline_names_give_valid_objects(
    name: str, scaledobject_schema: dict[str, Any]
) -> None:
    deployment, scaled = render_pipeline(make_spec(name), namespace="datumflow")
    validate_builtin(deployment)
    validate_scaledobject(scaled, scaledobject_schema)
    assert deployment["metadata"]["annotations"]["datumflow.io/pipeline-name"] == name
    # The consumer keeps the real pipeline name: it is a NATS name, not a Kubernetes one.
    assert scaled["spec"]["triggers"][0]["metadata"]["consumer"] == f"df-worker-{name}"


def test_worker_names_stay_distinct() -> None:
    names = ["a", "A", "a_", "a-", "a_b", "a-b", "A_b", "x" * 60 + "1", "x" * 60 + "2"]
    rendered = {render.worker_name(n) for n in names}
    labels = {render.pipeline_label(n) for n in names}
    assert len(rendered) == len(labels) == len(names)
    assert render.worker_name("edges") == "df-worker-edges"


@pytest.mark.parametrize(
    ("endpoint", "host_port", "https"),
    [
        ("nats.datumflow.svc:8222", "nats.datumflow.svc:8222", False),
        ("http://nats:8222", "nats:8222", False),
        ("http://nats:8222/", "nats:8222", False),
        ("https://nats.example.com:443", "nats.example.com:443", True),
        ("10.0.0.7:8222", "10.0.0.7:8222", False),
    ],
)
def test_monitor_endpoint(endpoint: str, host_port: str, https: bool) -> None:
    assert render.parse_monitor_endpoint(endpoint) == (host_port, https)
    scaled = render_pipeline(SPECS["constant"], namespace="d", monitor_endpoint=endpoint)[1]
    metadata = scaled["spec"]["triggers"][0]["metadata"]
    assert metadata["natsServerMonitoringEndpoint"] == host_port
    assert metadata.get("useHttps", "false") == str(https).lower()


@pytest.mark.parametrize("endpoint", ["", "nats", "nats:", "tcp://nats:8222", "nats:8222/jsz"])
def test_bad_monitor_endpoint(endpoint: str) -> None:
    with pytest.raises(RenderError, match="monitor"):
        render.parse_monitor_endpoint(endpoint)


def test_trigger_authentication_reference() -> None:
    scaled = render_pipeline(
        SPECS["constant"], namespace="datumflow", trigger_authentication="datumflow-nats-monitoring"
    )[1]
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["authenticationRef"] == {"name": "datumflow-nats-monitoring"}
    # The metadata still names the endpoint: the reference only overrides it.
    assert trigger["metadata"]["natsServerMonitoringEndpoint"] == render.DEFAULT_MONITOR_ENDPOINT


def test_spec_hash_rolls_workers_only_when_the_work_changes() -> None:
    def spec_hash(spec: PipelineSpec) -> str:
        deployment = render_pipeline(spec, namespace="datumflow")[0]
        return deployment["spec"]["template"]["metadata"]["annotations"]["datumflow.io/spec-hash"]

    base = spec_hash(make_spec())
    assert spec_hash(make_spec(parallelism_spec={"constant": 9})) == base
    assert spec_hash(make_spec(autoscaling=True, scaling={"lag_threshold": 4})) == base
    assert spec_hash(make_spec(transform={"cmd": ["python3", "/edges2.py"]})) != base
    assert spec_hash(make_spec(input={"pfs": {"repo": "images", "glob": "/"}})) != base


def test_render_yaml_round_trips() -> None:
    objects = render_pipeline(SPECS["resources"], namespace="datumflow")
    text = render_yaml(objects)
    assert list(yaml.safe_load_all(text)) == objects
    assert "&id" not in text and "*id" not in text  # no YAML anchors/aliases
    assert text.count("\n---\n") == 1
    # "$G" and the numbers-as-strings survive a YAML reader that guesses types.
    assert "lagThreshold: '10'" in text


def test_objects_share_no_structure() -> None:
    deployment, scaled = render_pipeline(SPECS["constant"], namespace="datumflow")
    deployment["metadata"]["labels"]["extra"] = "x"
    assert "extra" not in scaled["metadata"]["labels"]
    assert "extra" not in deployment["spec"]["template"]["metadata"]["labels"]


# --- the kustomize base and the KEDA component --------------------------------------------------

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


def kustomize(path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [o for o in yaml.safe_load_all(result.stdout) if o]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed")
    return kustomize(REPO_ROOT / "manifests")


@needs_kubectl
def test_base_builds_and_validates(base: list[dict[str, Any]]) -> None:
    kinds = sorted({o["kind"] for o in base})
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "Namespace",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Secret",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    ]
    for obj in base:
        validate_builtin(obj)
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "datumflow", obj["metadata"]["name"]


@needs_kubectl
def test_base_settings(base: list[dict[str, Any]]) -> None:
    data = find(base, "ConfigMap", "datumflow-settings")["data"]
    assert data["DATUMFLOW_NATS_URL"] == "nats://nats.datumflow.svc:4222"
    assert data["DATUMFLOW_MONITOR_URL"] == "nats.datumflow.svc:8222"
    assert data["DATUMFLOW_STORAGE"].startswith("s3://")
    # What the rendered workers read must exist here, under the same names.
    assert render.DEFAULT_MONITOR_ENDPOINT == data["DATUMFLOW_MONITOR_URL"]
    find(base, "Secret", "datumflow-secrets")
    find(base, "ServiceAccount", render.WORKER_SERVICE_ACCOUNT)


@needs_kubectl
def test_base_nats(base: list[dict[str, Any]]) -> None:
    nats = find(base, "StatefulSet", "nats")
    assert nats["spec"]["serviceName"] == "nats-headless"
    # Three servers, started together, never two on one node, at most one drained at a time.
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["podManagementPolicy"] == "Parallel"
    pod = nats["spec"]["template"]["spec"]
    (anti,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    assert anti["labelSelector"]["matchLabels"] == nats["spec"]["selector"]["matchLabels"]
    budget = find(base, "PodDisruptionBudget", "nats")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"] == nats["spec"]["selector"]
    (container,) = pod["containers"]
    assert container["image"].startswith("nats:2.14")
    assert container["args"] == ["--config", "/etc/nats/nats-server.conf"]
    assert {p["containerPort"] for p in container["ports"]} == {4222, 6222, 8222}
    (claim,) = nats["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    headless = find(base, "Service", "nats-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert {p["port"] for p in headless["spec"]["ports"]} == {4222, 6222, 8222}
    client = find(base, "Service", "nats")
    assert {p["port"] for p in client["spec"]["ports"]} == {4222, 8222}
    settings = find(base, "ConfigMap", "datumflow-settings")["data"]
    assert settings["DATUMFLOW_REPLICAS"] == str(nats["spec"]["replicas"])


@needs_kubectl
def test_base_nats_config_is_what_nats_server_accepts(
    base: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The config the pods run, checked by the real nats-server (`-t`), and routed to every pod
    of the StatefulSet, with JetStream storing on the volume."""
    config = find(base, "ConfigMap", "nats-config")["data"]["nats-server.conf"]
    replicas = find(base, "StatefulSet", "nats")["spec"]["replicas"]
    for i in range(replicas):
        assert f"nats://nats-{i}.nats-headless:6222" in config
    assert "store_dir: /data" in config
    assert "sync_interval: always" in config
    path = tmp_path / "nats-server.conf"
    path.write_text(config.replace("store_dir: /data", f"store_dir: {tmp_path / 'data'}"))
    checked = subprocess.run(
        [server_binary(), "-c", str(path), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "POD_NAME": "nats-0"},
    )
    assert checked.returncode == 0, checked.stderr + checked.stdout


@needs_kubectl
def test_base_control_plane(base: list[dict[str, Any]]) -> None:
    for name, account in [
        ("planner", "datumflow"),
        ("committer", "datumflow"),
        ("ingest", "datumflow"),
        ("controller", "datumflow-controller"),
    ]:
        deployment = find(base, "Deployment", name)
        pod = deployment["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == account
        (container,) = pod["containers"]
        assert container["command"] == ["datumflow", name]
        assert container["image"] == "ghcr.io/datumflow/datumflow:0.1.0"
        assert {"configMapRef": {"name": "datumflow-settings"}} in container["envFrom"]
    assert find(base, "ServiceAccount", "datumflow")["automountServiceAccountToken"] is False


@needs_kubectl
def test_base_console(base: list[dict[str, Any]]) -> None:
    """The console listens beyond loopback in its pod, so its token comes from its own Secret
    (not the one every function reads), and its Service reaches the port it listens on."""
    deployment = find(base, "Deployment", "console")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["datumflow", "console", "--address", "0.0.0.0:7480"]
    assert container["image"] == "ghcr.io/datumflow/datumflow:0.1.0"
    assert {"containerPort": 7480, "name": "http"} in container["ports"]
    assert {"secretRef": {"name": "datumflow-console", "optional": True}} in container["envFrom"]
    assert "DATUMFLOW_CONSOLE_TOKEN" in find(base, "Secret", "datumflow-console")["stringData"]
    for name in ("planner", "committer", "controller"):
        (other,) = find(base, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert {"secretRef": {"name": "datumflow-console", "optional": True}} not in other[
            "envFrom"
        ]
    service = find(base, "Service", "console")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http"}]
    assert pod["securityContext"]["runAsNonRoot"] is True


@needs_kubectl
def test_base_control_plane_has_no_single_replica(base: list[dict[str, Any]]) -> None:
    """Two of each function, spread over nodes, rolled one at a time, one kept through drains."""
    for name in ("planner", "committer", "ingest"):
        deployment = find(base, "Deployment", name)
        spec = deployment["spec"]
        assert spec["replicas"] == 2
        assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
        (term,) = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert term["podAffinityTerm"]["labelSelector"] == spec["selector"]
        budget = find(base, "PodDisruptionBudget", name)
        assert budget["spec"]["minAvailable"] == 1
        assert budget["spec"]["selector"] == spec["selector"]
    # The controller applies what the pipelines bucket says: one copy, never two at once.
    assert find(base, "Deployment", "controller")["spec"]["replicas"] == 1


def rules(obj: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in obj["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@needs_kubectl
def test_base_rbac_is_least_privilege(base: list[dict[str, Any]]) -> None:
    # Only the verbs the code uses (controller.py applies and deletes; pod_cost.py patches).
    verbs = ["create", "patch", "delete"]
    controller = rules(find(base, "Role", "datumflow-controller"))
    assert controller == {
        (group, resource, verb)
        for group, resource in [("apps", "deployments"), ("keda.sh", "scaledobjects")]
        for verb in verbs
    }
    nodes = rules(find(base, "ClusterRole", "datumflow-controller-nodes"))
    assert nodes == {("", "nodes", "list")}
    worker = rules(find(base, "Role", "datumflow-worker"))
    assert worker == {("", "pods", "patch")}
    for kind, name, account in [
        ("RoleBinding", "datumflow-controller", "datumflow-controller"),
        ("ClusterRoleBinding", "datumflow-controller-nodes", "datumflow-controller"),
        ("RoleBinding", "datumflow-worker", "datumflow-worker"),
    ]:
        binding = find(base, kind, name)
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": "datumflow"}
        ]
        assert binding["roleRef"]["name"] == name


@needs_kubectl
def test_rendered_workers_fit_the_base(base: list[dict[str, Any]]) -> None:
    # A worker rendered with the defaults finds its ConfigMap, Secret and service account.
    deployment = render_pipeline(SPECS["constant"], namespace="datumflow")[0]
    pod = deployment["spec"]["template"]["spec"]
    find(base, "ServiceAccount", pod["serviceAccountName"])
    for source in pod["containers"][0]["envFrom"]:
        ref = source.get("configMapRef") or source["secretRef"]
        find(base, "ConfigMap" if "configMapRef" in source else "Secret", ref["name"])


@needs_kubectl
def test_overlay_with_keda_component() -> None:
    objects = kustomize(DATA / "kustomize" / "keda-overlay")
    auth = find(objects, "TriggerAuthentication", "datumflow-nats-monitoring")
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    assert auth["metadata"]["namespace"] == "datumflow"
    assert auth["spec"]["env"] == [
        {
            "parameter": "natsServerMonitoringEndpoint",
            "name": "DATUMFLOW_MONITOR_URL",
            "containerName": render.WORKER_CONTAINER,
        }
    ]
    controller = find(objects, "Deployment", "controller")
    (container,) = controller["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DATUMFLOW_TRIGGER_AUTHENTICATION"] == auth["metadata"]["name"]
    assert container["image"] == "registry.example.com/datumflow:0.1.0-test"
    for obj in objects:
        if obj["kind"] != "TriggerAuthentication":  # no schema for it here
            validate_builtin(obj)
    keda = yaml.safe_load((REPO_ROOT / "keda" / "kustomization.yaml").read_text())
    assert (keda["apiVersion"], keda["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")


def test_dockerfile() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M)
    assert re.search(r'^ENTRYPOINT \["datumflow"\]$', text, re.M)
    # The worker's pod runs `datumflow worker`, with the image's user; it must not be root.
    assert re.search(r"^USER 10001$", text, re.M)
