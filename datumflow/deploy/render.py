"""A pipeline spec → its worker Deployment and KEDA ScaledObject, as plain dicts.

`datumflow render pipeline` prints them for kubectl; the controller applies them. The scaling numbers
come from `datumflow.scaling`, the same ones the local scaler uses.

Every object is a pure function of its arguments: no cluster is read, so the output can be diffed,
reviewed, and validated against the Kubernetes and KEDA schemas offline.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import msgspec
import yaml

from datumflow import scaling
from datumflow.broker import subjects
from datumflow.errors import PermanentError, SpecError
from datumflow.functions.worker.pod_cost import ANNOTATION as DELETION_COST_ANNOTATION
from datumflow.functions.worker.pod_cost import IDLE_COST
from datumflow.metrics import METRICS_PORT, SCRAPE_ANNOTATIONS
from datumflow.spec import ParallelismSpec, PipelineSpec, Resources, parse_duration

DEFAULT_IMAGE = "ghcr.io/datumflow/datumflow:0.1.0"
DEFAULT_MONITOR_ENDPOINT = "nats.datumflow.svc:8222"
WORKER_SERVICE_ACCOUNT = "datumflow-worker"
WORKER_CONTAINER = "worker"
# Without accounts configured every client of nats-server lives in the global account `$G`.
NATS_ACCOUNT = "$G"

NAME_LABEL = "app.kubernetes.io/name"
PIPELINE_LABEL = "datumflow.io/pipeline"
PIPELINE_ANNOTATION = "datumflow.io/pipeline-name"
SPEC_HASH_ANNOTATION = "datumflow.io/spec-hash"
WORKER_APP = "datumflow-worker"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# apimachinery's resource.Quantity syntax: "500m", "1.5", "2Gi", "1e3".
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkKMGTPE])?$")


class RenderError(PermanentError):
    """The pipeline cannot be turned into Kubernetes objects as asked; the message says why."""


def worker_name(pipeline: str) -> str:
    """Name of the pipeline's Deployment and ScaledObject: `df-worker-<pipeline>` when it can be.

    Kubernetes names are lowercase DNS labels and KEDA copies the ScaledObject name into a label
    value (63 characters at most). Pipeline names may hold capitals and `_`, so those, and names
    too long, get a lowercase form plus a hash of the real name, which keeps them distinct.
    """
    name = f"df-worker-{pipeline}"
    if len(name) <= 63 and _DNS_LABEL.match(name):
        return name
    safe = re.sub(r"[^a-z0-9-]", "-", pipeline.lower())[:43].strip("-")
    return f"df-worker-{safe}-{_digest(pipeline)}" if safe else f"df-worker-{_digest(pipeline)}"


def pipeline_label(pipeline: str) -> str:
    """The `datumflow.io/pipeline` label value: the name itself unless it ends in `-` or `_`."""
    if _LABEL_VALUE.match(pipeline):
        return pipeline
    return f"{pipeline.rstrip('-_')[:54]}-{_digest(pipeline)}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def parse_monitor_endpoint(endpoint: str) -> tuple[str, bool]:
    """`host:port` of the NATS monitoring port, and whether it is HTTPS.

    KEDA wants host:port without a scheme (`useHttps` says which); DATUMFLOW_MONITOR_URL may be
    written either way, so both are accepted here.
    """
    raw = endpoint.strip()
    https = False
    if "://" in raw:
        scheme, _, raw = raw.partition("://")
        if scheme not in ("http", "https"):
            raise RenderError(
                f"monitor endpoint {endpoint!r}: scheme must be http or https, or none at all"
            )
        https = scheme == "https"
    raw = raw.rstrip("/")
    host, _, port = raw.rpartition(":")
    if not host or not port.isdigit() or "/" in raw:
        raise RenderError(
            f"monitor endpoint {endpoint!r}: expected host:port of nats-server's monitoring port,"
            f" e.g. {DEFAULT_MONITOR_ENDPOINT} (set DATUMFLOW_MONITOR_URL)"
        )
    return raw, https


def render_pipeline(
    spec: PipelineSpec,
    *,
    namespace: str,
    image: str | None = None,
    settings_configmap: str = "datumflow-settings",
    settings_secret: str = "datumflow-secrets",
    nodes: int = 1,
    monitor_endpoint: str = DEFAULT_MONITOR_ENDPOINT,
    service_account: str = WORKER_SERVICE_ACCOUNT,
    trigger_authentication: str | None = None,
) -> list[dict[str, Any]]:
    """The worker Deployment and the KEDA ScaledObject for one pipeline, in apply order.

    The container image is `image` when given (a deliberate override, e.g. `--image`), else the
    spec's `transform.image`, else the datumflow image. `nodes` is the number of schedulable nodes,
    used by `parallelism_spec.coefficient`. `trigger_authentication` names a KEDA
    TriggerAuthentication (see keda/) whose parameters take precedence over the trigger metadata.
    """
    try:
        params = scaling.params_for(spec, nodes=nodes, place="kubernetes")
    except scaling.ScalingError as exc:
        raise SpecError(str(exc)) from None
    datum_timeout = parse_duration(spec.datum_timeout, field="datum_timeout")
    name = worker_name(spec.name)
    deployment = _deployment(
        spec,
        metadata=_metadata(spec, name=name, namespace=namespace),
        image=image or spec.transform.image or DEFAULT_IMAGE,
        settings_configmap=settings_configmap,
        settings_secret=settings_secret,
        service_account=service_account,
        drain=scaling.drain_seconds(datum_timeout),
        # Replicas belong to the HPA when the count moves; owning them here would make every
        # re-apply reset the count under running workers. A fixed count is set here as well, so
        # the pipeline gets its workers even where KEDA is not installed.
        replicas=None if params.autoscaled else params.max_replicas,
    )
    scaled_object = _scaled_object(
        spec,
        metadata=_metadata(spec, name=name, namespace=namespace),
        target=name,
        params=params,
        monitor_endpoint=monitor_endpoint,
        trigger_authentication=trigger_authentication,
    )
    return [deployment, scaled_object]


def _selector(spec: PipelineSpec) -> dict[str, str]:
    return {NAME_LABEL: WORKER_APP, PIPELINE_LABEL: pipeline_label(spec.name)}


def _labels(spec: PipelineSpec) -> dict[str, str]:
    return {
        **_selector(spec),
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/part-of": "datumflow",
        "app.kubernetes.io/managed-by": "datumflow",
    }


def _metadata(spec: PipelineSpec, *, name: str, namespace: str) -> dict[str, Any]:
    # Fresh dicts on every call: the objects share no structure, so a caller may edit one safely.
    return {
        "name": name,
        "namespace": namespace,
        "labels": _labels(spec),
        "annotations": {PIPELINE_ANNOTATION: spec.name},
    }


def _deployment(
    spec: PipelineSpec,
    *,
    metadata: dict[str, Any],
    image: str,
    settings_configmap: str,
    settings_secret: str,
    service_account: str,
    drain: float,
    replicas: int | None,
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": image,
        # The full command, not args: a user image built FROM ours may set its own ENTRYPOINT.
        "command": ["datumflow", "worker", "--pipeline", spec.name],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            # The worker owns /pfs in a pod (the emptyDir below): no private mounts needed.
            {"name": "DATUMFLOW_PFS_MODE", "value": "direct"},
            # How long the worker finishes its datum after SIGTERM; the pod's grace period is
            # this plus a margin, so the worker always gets to hand the datum back.
            {"name": "DATUMFLOW_GRACE", "value": _seconds(drain)},
            # Live metrics (busy, redeliveries) on the port the annotations name (docs/metrics.md).
            {"name": "DATUMFLOW_METRICS", "value": f":{METRICS_PORT}"},
        ],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "envFrom": [
            {"configMapRef": {"name": settings_configmap}},
            # Optional: a cluster whose NATS and object store need no credentials has no Secret.
            {"secretRef": {"name": settings_secret, "optional": True}},
        ],
        "volumeMounts": [{"name": "pfs", "mountPath": "/pfs"}],
    }
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    scratch: dict[str, Any] = {}
    if spec.resource_limits and spec.resource_limits.disk:
        # Pachyderm's disk limit bounds the datum's scratch space, which is this volume.
        scratch["sizeLimit"] = _quantity(spec.resource_limits.disk, "resource_limits.disk")
    body: dict[str, Any] = {}
    if replicas is not None:
        body["replicas"] = replicas
    body |= {
        "revisionHistoryLimit": 3,
        "selector": {"matchLabels": _selector(spec)},
        "template": {
            "metadata": {
                "labels": _labels(spec),
                "annotations": {
                    # A new pod holds no datum yet: cheapest to remove until it marks itself busy.
                    DELETION_COST_ANNOTATION: IDLE_COST,
                    # Changes with the transform or inputs, so updating a pipeline rolls its
                    # workers; parallelism and scaling changes do not restart anything.
                    SPEC_HASH_ANNOTATION: _spec_hash(spec),
                    **SCRAPE_ANNOTATIONS,
                },
            },
            "spec": {
                "serviceAccountName": service_account,
                "terminationGracePeriodSeconds": scaling.termination_grace_seconds(drain),
                "containers": [container],
                "volumes": [{"name": "pfs", "emptyDir": scratch}],
            },
        },
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": body}


def _scaled_object(
    spec: PipelineSpec,
    *,
    metadata: dict[str, Any],
    target: str,
    params: scaling.ScalingParams,
    monitor_endpoint: str,
    trigger_authentication: str | None,
) -> dict[str, Any]:
    endpoint, https = parse_monitor_endpoint(monitor_endpoint)
    trigger_metadata = {
        "natsServerMonitoringEndpoint": endpoint,
        "account": NATS_ACCOUNT,
        "stream": subjects.DATUMS_STREAM,
        "consumer": subjects.worker_consumer(spec.name),
        # KEDA reads every metadata value as a string.
        "lagThreshold": str(params.lag_threshold),
        "activationLagThreshold": str(params.activation_lag_threshold),
    }
    if https:
        trigger_metadata["useHttps"] = "true"
    trigger: dict[str, Any] = {"type": "nats-jetstream", "name": "datum-lag"}
    trigger["metadata"] = trigger_metadata
    if trigger_authentication:
        trigger["authenticationRef"] = {"name": trigger_authentication}
    body = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
        # KEDA counts whole seconds, and polls at least every second.
        "pollingInterval": max(1, math.ceil(params.polling_interval)),
        "cooldownPeriod": math.ceil(params.cooldown_period),
        "minReplicaCount": params.min_replicas,
        "maxReplicaCount": params.max_replicas,
        "advanced": {
            "horizontalPodAutoscalerConfig": {
                "behavior": {
                    # The HPA's default keeps the highest count of the last 5 minutes; idle pods
                    # go first (pod-deletion-cost), so a shorter window is safe and frees nodes.
                    "scaleDown": {
                        "stabilizationWindowSeconds": min(3600, math.ceil(params.scale_down_window))
                    },
                    # The default scale-up at most doubles every 15 s; go straight to what the lag
                    # asks, as the local scaler does.
                    "scaleUp": {
                        "stabilizationWindowSeconds": 0,
                        "policies": [
                            {"type": "Pods", "value": params.max_replicas, "periodSeconds": 15}
                        ],
                    },
                }
            }
        },
        "triggers": [trigger],
    }
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": metadata,
        "spec": body,
    }


def _seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _spec_hash(spec: PipelineSpec) -> str:
    what_runs = msgspec.structs.replace(
        spec,
        parallelism_spec=ParallelismSpec(),
        autoscaling=False,
        standby=False,
        scaling=None,
        description="",
    )
    return hashlib.sha256(msgspec.json.encode(what_runs)).hexdigest()[:16]


def _resources(spec: PipelineSpec) -> dict[str, dict[str, str]]:
    requests = _resource_list(spec.resource_requests, "resource_requests")
    limits = _resource_list(spec.resource_limits, "resource_limits")
    # Kubernetes wants extended resources (GPUs) in limits, equal to the request when both are set.
    for key, value in requests.items():
        if "/" in key and limits.setdefault(key, value) != value:
            raise SpecError(
                f"resource_requests.gpu: {value} {key} differs from resource_limits.gpu"
                f" ({limits[key]}); Kubernetes needs them equal, set one of the two"
            )
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _resource_list(res: Resources | None, field: str) -> dict[str, str]:
    if res is None:
        return {}
    out: dict[str, str] = {}
    if res.cpu is not None:
        out["cpu"] = _cpu(res.cpu, f"{field}.cpu")
    if res.memory:
        out["memory"] = _quantity(res.memory, f"{field}.memory")
    if res.disk:
        out["ephemeral-storage"] = _quantity(res.disk, f"{field}.disk")
    if res.gpu:
        kind = res.gpu.get("type")
        number = res.gpu.get("number", 1)
        if not isinstance(kind, str) or "/" not in kind:
            raise SpecError(
                f"{field}.gpu.type: expected a Kubernetes resource name such as"
                f" 'nvidia.com/gpu', got {kind!r}"
            )
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise SpecError(f"{field}.gpu.number: expected a whole number >= 1, got {number!r}")
        out[kind] = str(number)
    return out


def _cpu(value: float | str, field: str) -> str:
    if isinstance(value, str):
        return _quantity(value, field)
    if value <= 0:
        raise SpecError(f"{field}: must be > 0 cores, got {value}")
    millis = round(value * 1000)
    if millis == 0:
        raise SpecError(f"{field}: {value} cores is below Kubernetes' 1m (0.001) resolution")
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def _quantity(value: str, field: str) -> str:
    if not _QUANTITY.match(value):
        raise SpecError(
            f"{field}: {value!r} is not a Kubernetes quantity (e.g. '500m', '2', '512Mi', '10Gi')"
        )
    return value


class _PlainDumper(yaml.SafeDumper):
    # Anchors and aliases (&id001) are valid YAML but unreadable in a manifest, and not every tool
    # that reads manifests resolves them; write repeated values out in full.
    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_yaml(objects: list[dict[str, Any]]) -> str:
    """Objects as one multi-document YAML stream, for `kubectl apply -f -`."""
    return yaml.dump_all(objects, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False)
