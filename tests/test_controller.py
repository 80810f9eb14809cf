"""The controller's reconcile logic and the worker's pod-deletion-cost marker.

No cluster runs here. The kubernetes client's own ApiClient is subclassed so that `call_api`
records each request (method, path, query, headers, body) and answers from a small in-memory API
server; everything above it (request building, model deserialization) is the real client.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from kubernetes.client import ApiClient, Configuration, CoreV1Api, rest

from datumflow.deploy.controller import (
    Controller,
    KubernetesError,
    count_schedulable_nodes,
)
from datumflow.deploy.render import render_pipeline
from datumflow.functions.worker.pod_cost import (
    ANNOTATION,
    NoPodDeletionCost,
    PodDeletionCost,
    pod_deletion_cost,
)
from datumflow.spec import PipelineSpec, load_spec

NS = "datumflow"
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NS}/deployments"
SCALEDOBJECTS = f"/apis/keda.sh/v1alpha1/namespaces/{NS}/scaledobjects"
APPLY_QUERY = {"fieldManager": "datumflow", "force": "true"}


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class _HTTPResponse:
    # The part of urllib3's response that kubernetes.client.rest.RESTResponse reads.
    status: int
    data: bytes
    reason: str = ""
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})


def node(
    name: str,
    *,
    ready: str = "True",
    unschedulable: bool = False,
    taints: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if unschedulable:
        spec["unschedulable"] = True
    if taints:
        spec["taints"] = taints
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": spec,
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": ready},
            ]
        },
    }


def ready_nodes(n: int) -> list[dict[str, Any]]:
    return [node(f"node-{i}") for i in range(n)]


class RecordingApiClient(ApiClient):
    """An ApiClient whose call_api records the request and answers from memory."""

    def __init__(self) -> None:
        super().__init__(Configuration(host="https://kube.test"))
        self.calls: list[Call] = []
        self.nodes: list[dict[str, Any]] = ready_nodes(3)
        self.page_size: int | None = None
        """Serve the node list in pages of this size (with continue tokens)."""
        self.failures: dict[tuple[str, str], list[int]] = {}
        """(method, path) → statuses to answer with, one per call, before answering normally."""
        self.existing: set[str] = set()
        """Paths of objects that exist (applied and not deleted)."""

    def fail(self, method: str, path: str, *statuses: int) -> None:
        self.failures.setdefault((method, path), []).extend(statuses)

    def call_api(
        self,
        method: str,
        url: str,
        header_params: dict[str, str] | None = None,
        body: Any = None,
        post_params: Any = None,
        _request_timeout: Any = None,
    ) -> rest.RESTResponse:
        parts = urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}" == "https://kube.test"
        call = Call(
            method, parts.path, dict(parse_qsl(parts.query)), dict(header_params or {}), body
        )
        self.calls.append(call)
        status, payload = self._answer(call)
        return rest.RESTResponse(_HTTPResponse(status, json.dumps(payload).encode()))

    def _answer(self, call: Call) -> tuple[int, Any]:
        pending = self.failures.get((call.method, call.path))
        if pending:
            status = pending.pop(0)
            return status, {"kind": "Status", "status": "Failure", "message": f"nope ({status})"}
        if call.method == "GET" and call.path == "/api/v1/nodes":
            start = int(call.query.get("continue", "0"))
            end = len(self.nodes) if self.page_size is None else start + self.page_size
            meta = {"continue": str(end)} if end < len(self.nodes) else {}
            return 200, {"kind": "NodeList", "metadata": meta, "items": self.nodes[start:end]}
        if call.method == "PATCH":
            self.existing.add(call.path)
            return 200, call.body
        if call.method == "DELETE":
            if call.path not in self.existing:
                return 404, {"kind": "Status", "status": "Failure", "reason": "NotFound"}
            self.existing.discard(call.path)
            return 200, {"kind": "Status", "status": "Success"}
        raise AssertionError(f"unexpected request {call}")

    def take(self) -> list[Call]:
        calls, self.calls = self.calls, []
        return calls


def make_spec(name: str, **fields: Any) -> PipelineSpec:
    doc = {
        "pipeline": {"name": name},
        "input": {"pfs": {"repo": "images", "glob": "/*"}},
        "transform": {"cmd": ["python3", "/run.py"]},
        **fields,
    }
    return load_spec(json.dumps(doc))


CONSTANT = make_spec("edges", parallelism_spec={"constant": 4})
COEFFICIENT = make_spec("montage", parallelism_spec={"coefficient": 0.5})
AUTO_COEFFICIENT = make_spec("sparse", parallelism_spec={"coefficient": 2.0}, autoscaling=True)


@pytest.fixture
def api() -> RecordingApiClient:
    return RecordingApiClient()


@pytest.fixture
def controller(api: RecordingApiClient) -> Controller:
    return Controller(api_client=api, namespace=NS, image="df:test", node_check_interval=3600)


def applies(calls: list[Call]) -> list[tuple[str, dict[str, Any]]]:
    """(path, body) of each server-side apply, checking that each is one."""
    out = []
    for call in calls:
        if call.method != "PATCH":
            continue
        assert call.query == APPLY_QUERY
        assert call.headers["Content-Type"] == "application/apply-patch+yaml"
        out.append((call.path, call.body))
    return out


def expected_applies(spec: PipelineSpec, *, nodes: int, **kw: Any) -> list[tuple[str, Any]]:
    deployment, scaled = render_pipeline(spec, namespace=NS, image="df:test", nodes=nodes, **kw)
    name = deployment["metadata"]["name"]
    return [(f"{DEPLOYMENTS}/{name}", deployment), (f"{SCALEDOBJECTS}/{name}", scaled)]


# --- apply and delete -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_apply_pipeline_applies_the_rendered_objects(
    api: RecordingApiClient, controller: Controller
) -> None:
    applied = await controller.apply_pipeline(COEFFICIENT)
    calls = api.take()
    # First use: the node count (3 Ready nodes), then the two objects, Deployment first.
    assert [(c.method, c.path) for c in calls[:1]] == [("GET", "/api/v1/nodes")]
    assert applies(calls) == expected_applies(COEFFICIENT, nodes=3)
    assert [body for _, body in applies(calls)] == applied
    assert applied[1]["spec"]["maxReplicaCount"] == 2  # ceil(0.5 * 3)
    assert controller.nodes == 3
    assert controller.pipelines == {"montage": COEFFICIENT}

    # Nodes are counted once, not on every apply.
    await controller.apply_pipeline(CONSTANT)
    assert applies(api.take()) == expected_applies(CONSTANT, nodes=3)


@pytest.mark.asyncio
async def test_controller_options_reach_the_objects(api: RecordingApiClient) -> None:
    controller = Controller(
        api_client=api,
        namespace=NS,
        image="df:test",
        monitor_endpoint="http://nats.infra.svc:8222",
        settings_configmap="my-settings",
        settings_secret="my-secrets",
        trigger_authentication="datumflow-nats-monitoring",
    )
    await controller.apply_pipeline(CONSTANT)
    assert applies(api.take()) == expected_applies(
        CONSTANT,
        nodes=3,
        monitor_endpoint="nats.infra.svc:8222",
        settings_configmap="my-settings",
        settings_secret="my-secrets",
        trigger_authentication="datumflow-nats-monitoring",
    )


@pytest.mark.asyncio
async def test_delete_pipeline(api: RecordingApiClient, controller: Controller) -> None:
    await controller.apply_pipeline(CONSTANT)
    api.take()
    await controller.delete_pipeline("edges")
    calls = api.take()
    # The ScaledObject first, so KEDA stops scaling the Deployment that goes next.
    assert [(c.method, c.path) for c in calls] == [
        ("DELETE", f"{SCALEDOBJECTS}/df-worker-edges"),
        ("DELETE", f"{DEPLOYMENTS}/df-worker-edges"),
    ]
    for call in calls:
        assert call.body["propagationPolicy"] == "Background"
    assert controller.pipelines == {}

    # Deleting again (a replayed event, or objects removed by hand) is not an error.
    await controller.delete_pipeline("edges")
    assert [c.method for c in api.take()] == ["DELETE", "DELETE"]


@pytest.mark.asyncio
async def test_apply_errors_say_what_to_do(api: RecordingApiClient, controller: Controller) -> None:
    api.fail("PATCH", f"{SCALEDOBJECTS}/df-worker-edges", 404)
    with pytest.raises(KubernetesError, match=r"install KEDA") as info:
        await controller.apply_pipeline(CONSTANT)
    assert info.value.status == 404 and info.value.retryable
    api.fail("PATCH", f"{DEPLOYMENTS}/df-worker-edges", 403)
    with pytest.raises(KubernetesError, match=r"manifests/rbac\.yaml"):
        await controller.apply_pipeline(CONSTANT)
    api.fail("PATCH", f"{DEPLOYMENTS}/df-worker-edges", 422)
    with pytest.raises(KubernetesError, match=r"nope \(422\)") as info:
        await controller.apply_pipeline(CONSTANT)
    assert not info.value.retryable


# --- nodes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        (ready_nodes(3), 3),
        ([], 0),
        ([node("a"), node("b", ready="False"), node("c", ready="Unknown")], 1),
        ([node("a"), node("b", unschedulable=True)], 1),  # cordoned
        (
            [
                node("a"),
                node(
                    "cp",
                    taints=[
                        {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
                    ],
                ),
                node("gone", taints=[{"key": "example.com/evict", "effect": "NoExecute"}]),
                node("soft", taints=[{"key": "example.com/prefer", "effect": "PreferNoSchedule"}]),
            ],
            2,  # a PreferNoSchedule taint still takes pods
        ),
    ],
)
def test_count_schedulable_nodes(
    api: RecordingApiClient, nodes: list[dict[str, Any]], expected: int
) -> None:
    api.nodes = nodes
    assert count_schedulable_nodes(CoreV1Api(api)) == expected


def test_count_schedulable_nodes_follows_pages(api: RecordingApiClient) -> None:
    api.nodes = [*ready_nodes(5), node("x", ready="False")]
    api.page_size = 2
    assert count_schedulable_nodes(CoreV1Api(api)) == 5
    calls = api.take()
    assert [c.query.get("continue") for c in calls] == [None, "2", "4"]
    assert all(c.query["limit"] == "500" for c in calls)


@pytest.mark.asyncio
async def test_resize_for_nodes_reapplies_coefficient_pipelines(
    api: RecordingApiClient, controller: Controller
) -> None:
    resized = await controller.resize_for_nodes([CONSTANT, COEFFICIENT, AUTO_COEFFICIENT], 7)
    assert resized == ["montage", "sparse"]
    calls = api.take()
    assert applies(calls) == expected_applies(COEFFICIENT, nodes=7) + expected_applies(
        AUTO_COEFFICIENT, nodes=7
    )
    scaled = [body for path, body in applies(calls) if path.startswith(SCALEDOBJECTS)]
    assert [(s["spec"]["minReplicaCount"], s["spec"]["maxReplicaCount"]) for s in scaled] == [
        (4, 4),  # ceil(0.5 * 7), fixed
        (0, 14),  # 2.0 * 7, from zero
    ]
    assert controller.nodes == 7


@pytest.mark.asyncio
async def test_check_nodes_resizes_only_on_change(
    api: RecordingApiClient, controller: Controller
) -> None:
    for spec in (CONSTANT, COEFFICIENT):
        await controller.apply_pipeline(spec)
    api.take()

    assert await controller.check_nodes() is False  # still 3
    assert applies(api.take()) == []

    api.nodes = [*ready_nodes(5), node("cordoned", unschedulable=True)]
    assert await controller.check_nodes() is True
    assert applies(api.take()) == expected_applies(COEFFICIENT, nodes=5)

    assert await controller.check_nodes() is False
    assert applies(api.take()) == []


@pytest.mark.asyncio
async def test_deleted_pipelines_are_not_resized(
    api: RecordingApiClient, controller: Controller
) -> None:
    await controller.apply_pipeline(COEFFICIENT)
    await controller.delete_pipeline("montage")
    api.take()
    api.nodes = ready_nodes(9)
    assert await controller.check_nodes() is True
    assert applies(api.take()) == []


# --- the event loop -------------------------------------------------------------------------------


async def events_from(
    items: list[tuple[str, PipelineSpec | None] | Callable[[], Any]],
) -> AsyncIterator[tuple[str, PipelineSpec | None]]:
    for item in items:
        if callable(item):
            await item()
        else:
            yield item


@pytest.mark.asyncio
async def test_run_applies_and_deletes_in_order(
    api: RecordingApiClient, controller: Controller
) -> None:
    await controller.run(
        events_from([("edges", CONSTANT), ("montage", COEFFICIENT), ("edges", None)])
    )
    calls = api.take()
    assert [(c.method, c.path) for c in calls] == [
        ("GET", "/api/v1/nodes"),
        ("PATCH", f"{DEPLOYMENTS}/df-worker-edges"),
        ("PATCH", f"{SCALEDOBJECTS}/df-worker-edges"),
        ("PATCH", f"{DEPLOYMENTS}/df-worker-montage"),
        ("PATCH", f"{SCALEDOBJECTS}/df-worker-montage"),
        ("DELETE", f"{SCALEDOBJECTS}/df-worker-edges"),
        ("DELETE", f"{DEPLOYMENTS}/df-worker-edges"),
    ]
    assert controller.pipelines == {"montage": COEFFICIENT}


@pytest.mark.asyncio
async def test_run_checks_nodes_periodically(api: RecordingApiClient) -> None:
    controller = Controller(api_client=api, namespace=NS, image="df:test", node_check_interval=0.01)
    grown = asyncio.Event()
    check_nodes = controller.check_nodes

    async def check_nodes_and_tell() -> bool:
        changed = await check_nodes()
        if controller.nodes == 8:
            grown.set()
        return changed

    controller.check_nodes = check_nodes_and_tell  # type: ignore[method-assign]

    async def grow_cluster() -> None:
        api.nodes = ready_nodes(8)
        # The event stream stays open until the background check has seen the new nodes.
        await asyncio.wait_for(grown.wait(), timeout=5)

    await controller.run(events_from([("montage", COEFFICIENT), grow_cluster]))
    applied = applies(api.take())
    assert applied == expected_applies(COEFFICIENT, nodes=3) + expected_applies(
        COEFFICIENT, nodes=8
    )


@pytest.mark.asyncio
async def test_failed_events_are_retried_at_the_next_tick(
    api: RecordingApiClient, controller: Controller, caplog: pytest.LogCaptureFixture
) -> None:
    # KEDA is not installed yet when the pipeline arrives; the other pipeline is not held up.
    api.fail("PATCH", f"{SCALEDOBJECTS}/df-worker-edges", 404)
    with caplog.at_level(logging.ERROR, logger="datumflow.deploy.controller"):
        await controller.run(events_from([("edges", CONSTANT), ("montage", COEFFICIENT)]))
    assert "install KEDA" in caplog.text
    assert "edges" not in controller.pipelines and "montage" in controller.pipelines
    api.take()

    await controller.tick()
    assert applies(api.take()) == expected_applies(CONSTANT, nodes=3)
    assert "edges" in controller.pipelines

    await controller.tick()  # nothing left to retry
    assert applies(api.take()) == []


@pytest.mark.asyncio
async def test_rejected_objects_are_not_retried(
    api: RecordingApiClient, controller: Controller, caplog: pytest.LogCaptureFixture
) -> None:
    api.fail("PATCH", f"{DEPLOYMENTS}/df-worker-edges", 422)
    bad = make_spec("broken", resource_limits={"memory": "lots"})
    with caplog.at_level(logging.ERROR, logger="datumflow.deploy.controller"):
        await controller.run(events_from([("edges", CONSTANT), ("broken", bad)]))
    assert "resource_limits.memory" in caplog.text
    api.take()
    await controller.tick()
    assert applies(api.take()) == []


@pytest.mark.asyncio
async def test_failed_deletes_are_retried(api: RecordingApiClient, controller: Controller) -> None:
    await controller.apply_pipeline(CONSTANT)
    api.fail("DELETE", f"{SCALEDOBJECTS}/df-worker-edges", 503)
    await controller.handle("edges", None)
    api.take()
    await controller.tick()
    assert [(c.method, c.path) for c in api.take() if c.method == "DELETE"] == [
        ("DELETE", f"{SCALEDOBJECTS}/df-worker-edges"),
        ("DELETE", f"{DEPLOYMENTS}/df-worker-edges"),
    ]
    assert controller.pipelines == {}


# --- pod deletion cost ----------------------------------------------------------------------------


def cost_patches(calls: list[Call]) -> list[str]:
    out = []
    for call in calls:
        assert (call.method, call.path) == ("PATCH", "/api/v1/namespaces/pipelines/pods/w-1")
        assert call.headers["Content-Type"] == "application/merge-patch+json"
        out.append(call.body["metadata"]["annotations"][ANNOTATION])
    return out


@pytest.mark.asyncio
async def test_pod_deletion_cost_patches_once_per_change(api: RecordingApiClient) -> None:
    marker = PodDeletionCost(pod_name="w-1", namespace="pipelines", core_v1=CoreV1Api(api))
    await marker.busy()
    await marker.busy()
    await marker.idle()
    await marker.idle()
    await marker.idle()
    await marker.busy()
    assert cost_patches(api.take()) == ["100", "-100", "100"]


@pytest.mark.asyncio
async def test_pod_deletion_cost_failures_are_logged_not_raised(
    api: RecordingApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    api.fail("PATCH", "/api/v1/namespaces/pipelines/pods/w-1", 403)
    marker = PodDeletionCost(pod_name="w-1", namespace="pipelines", core_v1=CoreV1Api(api))
    with caplog.at_level(logging.WARNING, logger="datumflow.functions.worker.pod_cost"):
        await marker.busy()
    assert "may patch pods" in caplog.text
    # Not remembered as set: the next busy() tries again, and succeeds.
    await marker.busy()
    await marker.busy()
    assert cost_patches(api.take()) == ["100", "100"]


@pytest.mark.asyncio
async def test_pod_deletion_cost_outside_a_pod(api: RecordingApiClient) -> None:
    for pod_name, namespace in [(None, None), ("", "x"), ("w-1", None)]:
        marker = pod_deletion_cost(pod_name=pod_name, namespace=namespace, core_v1=CoreV1Api(api))
        assert isinstance(marker, NoPodDeletionCost)
        await marker.busy()
        await marker.idle()
    assert api.take() == []
    marker = pod_deletion_cost(pod_name="w-1", namespace="pipelines", core_v1=CoreV1Api(api))
    assert isinstance(marker, PodDeletionCost)


@pytest.mark.asyncio
async def test_pod_deletion_cost_without_cluster_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # In a "pod" without a service account token (or here, outside any cluster): no marker.
    with caplog.at_level(logging.WARNING, logger="datumflow.functions.worker.pod_cost"):
        marker = pod_deletion_cost(pod_name="w-1", namespace="pipelines")
    assert isinstance(marker, NoPodDeletionCost)
    assert "cannot reach the Kubernetes API" in caplog.text
