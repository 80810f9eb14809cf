"""The Kubernetes controller: keeps each pipeline's worker Deployment and ScaledObject applied.

Pipeline events (name, spec) come from a watch on the pipelines bucket written elsewhere; a spec of
None means the pipeline was deleted. For each event the controller renders the objects
(`datumflow.deploy.render`) and server-side applies them, or deletes them. Every `node_check_interval`
seconds it counts the schedulable nodes and, when the count changed, re-applies the pipelines whose
parallelism is a coefficient of it; the same tick retries events that failed.

The Kubernetes client is synchronous: each request runs in a thread (`asyncio.to_thread`). Requests
go through `ApiClient.param_serialize` and `ApiClient.call_api`, the client's own generic path, so a
Deployment and a KEDA ScaledObject (which has no typed API) are applied the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from datumflow.deploy.render import DEFAULT_MONITOR_ENDPOINT, render_pipeline, worker_name
from datumflow.errors import DatumflowError, PermanentError
from datumflow.spec import PipelineSpec

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, CoreV1Api

log = logging.getLogger(__name__)

FIELD_MANAGER = "datumflow"
APPLY_PATCH = "application/apply-patch+yaml"
REQUEST_TIMEOUT_SECONDS = 30.0
DEFAULT_NODE_CHECK_INTERVAL = 30.0

# Where each kind we write lives in the API. Deletion goes in reverse: the ScaledObject first, so
# KEDA stops scaling a Deployment that is about to go.
_COLLECTIONS: dict[tuple[str, str], str] = {
    ("apps/v1", "Deployment"): "/apis/apps/v1/namespaces/{namespace}/deployments",
    (
        "keda.sh/v1alpha1",
        "ScaledObject",
    ): "/apis/keda.sh/v1alpha1/namespaces/{namespace}/scaledobjects",
}


class KubernetesError(DatumflowError):
    """A request to the Kubernetes API failed; the message says which and what to check."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        # 400 and 422: the object itself is wrong, sending it again cannot help. The rest (RBAC
        # not granted yet, KEDA not installed yet, API server busy) can pass.
        return self.status not in (400, 422)


def object_path(api_version: str, kind: str, *, namespace: str, name: str) -> str:
    try:
        collection = _COLLECTIONS[(api_version, kind)]
    except KeyError:
        raise KubernetesError(
            f"the controller does not manage {kind} ({api_version}) objects"
        ) from None
    return collection.format(namespace=namespace) + "/" + name


def count_schedulable_nodes(core_v1_api: CoreV1Api) -> int:
    """Nodes a worker pod can land on: Ready, not cordoned, and not tainted against new pods.

    Workers carry no tolerations, so a node with a NoSchedule or NoExecute taint (a control-plane
    node, one being drained) takes none of them and must not raise a coefficient's worker count.
    Synchronous: call it through `asyncio.to_thread`.
    """
    count = 0
    token: str | None = None
    while True:
        page = core_v1_api.list_node(limit=500, _continue=token)
        count += sum(1 for node in page.items or [] if _schedulable(node))
        meta = page.metadata
        # The client spells the field `var_continue` since its pydantic models, `_continue` before.
        token = getattr(meta, "var_continue", None) or getattr(meta, "_continue", None)
        if not token:
            return count


def _schedulable(node: Any) -> bool:
    spec = node.spec
    if spec is not None and spec.unschedulable:
        return False
    if spec is not None and any(t.effect in ("NoSchedule", "NoExecute") for t in spec.taints or []):
        return False
    conditions = (node.status.conditions if node.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


class Controller:
    """Reconciles pipelines into worker Deployments and KEDA ScaledObjects in one namespace."""

    def __init__(
        self,
        *,
        api_client: ApiClient,
        namespace: str,
        image: str | None = None,
        monitor_endpoint: str = DEFAULT_MONITOR_ENDPOINT,
        settings_configmap: str = "datumflow-settings",
        settings_secret: str = "datumflow-secrets",
        trigger_authentication: str | None = None,
        core_v1: CoreV1Api | None = None,
        node_check_interval: float = DEFAULT_NODE_CHECK_INTERVAL,
    ) -> None:
        if core_v1 is None:
            from kubernetes.client import CoreV1Api

            core_v1 = CoreV1Api(api_client)
        self._api = api_client
        self._core_v1 = core_v1
        self.namespace = namespace
        self.image = image
        self.monitor_endpoint = monitor_endpoint
        self.settings_configmap = settings_configmap
        self.settings_secret = settings_secret
        self.trigger_authentication = trigger_authentication
        self.node_check_interval = node_check_interval
        self.nodes: int | None = None
        """Schedulable nodes at the last count; None until counted."""
        self.pipelines: dict[str, PipelineSpec] = {}
        """Pipelines applied, by name."""
        self._retry: dict[str, PipelineSpec | None] = {}
        # One change at a time: a node-count resize must not re-apply a pipeline that an event
        # is deleting, nor interleave with its apply.
        self._lock = asyncio.Lock()

    def render(self, spec: PipelineSpec, *, nodes: int) -> list[dict[str, Any]]:
        return render_pipeline(
            spec,
            namespace=self.namespace,
            image=self.image,
            settings_configmap=self.settings_configmap,
            settings_secret=self.settings_secret,
            nodes=nodes,
            monitor_endpoint=self.monitor_endpoint,
            trigger_authentication=self.trigger_authentication,
        )

    async def apply_pipeline(self, spec: PipelineSpec) -> list[dict[str, Any]]:
        """Render and server-side apply the pipeline's objects; returns what was applied."""
        async with self._lock:
            return await self._apply_pipeline(spec, nodes=await self._node_count())

    async def delete_pipeline(self, name: str) -> None:
        """Delete the pipeline's ScaledObject, then its Deployment; gone already is fine."""
        async with self._lock:
            await self._delete_pipeline(name)

    async def resize_for_nodes(self, specs: Iterable[PipelineSpec], nodes: int) -> list[str]:
        """Re-apply the coefficient pipelines among `specs` for `nodes` schedulable nodes.

        Returns the names re-applied. Pipelines with a constant parallelism do not depend on the
        node count and are left alone.
        """
        async with self._lock:
            return await self._resize(specs, nodes)

    async def check_nodes(self) -> bool:
        """Count schedulable nodes; on a change, resize the known pipelines. True if it changed."""
        nodes = await asyncio.to_thread(count_schedulable_nodes, self._core_v1)
        async with self._lock:
            if nodes == self.nodes:
                return False
            log.info("schedulable nodes: %s -> %s", self.nodes, nodes)
            await self._resize(list(self.pipelines.values()), nodes)
            return True

    async def handle(self, name: str, spec: PipelineSpec | None) -> None:
        """One pipeline event. A failure is logged and retried at the next tick, never raised:
        one pipeline the cluster rejects must not stop the others."""
        try:
            if spec is None:
                await self.delete_pipeline(name)
                log.info("pipeline %r: worker objects deleted", name)
            else:
                if spec.name != name:
                    log.warning("pipeline event for %r carries the spec of %r", name, spec.name)
                objects = await self.apply_pipeline(spec)
                log.info(
                    "pipeline %r: applied %s",
                    name,
                    ", ".join(f"{o['kind']} {o['metadata']['name']}" for o in objects),
                )
        except Exception as exc:
            action = "delete" if spec is None else "apply"
            if isinstance(exc, PermanentError) or (
                isinstance(exc, KubernetesError) and not exc.retryable
            ):
                # Only a new version of the spec can fix it; it will come as a new event.
                log.error("cannot %s pipeline %r: %s", action, name, exc)
                self._retry.pop(name, None)
                return
            log.error("could not %s pipeline %r (will retry): %s", action, name, exc)
            self._retry[name] = spec
        else:
            self._retry.pop(name, None)

    async def tick(self) -> None:
        """The periodic work: node count, then the events that failed before."""
        try:
            await self.check_nodes()
        except Exception as exc:
            log.error(
                "could not count schedulable nodes: %s; coefficient pipelines keep their current"
                " size. The controller's service account needs list on nodes (ClusterRole"
                " datumflow-controller-nodes in manifests/rbac.yaml).",
                exc,
            )
        for name, spec in list(self._retry.items()):
            await self.handle(name, spec)

    async def run(self, events: AsyncIterator[tuple[str, PipelineSpec | None]]) -> None:
        """Apply pipeline events until the iterator ends, checking nodes in the background."""
        await self.tick()
        ticker = asyncio.create_task(self._tick_forever(), name="datumflow-controller-nodes")
        try:
            async for name, spec in events:
                await self.handle(name, spec)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.node_check_interval)
            await self.tick()

    async def _node_count(self) -> int:
        if self.nodes is None:
            try:
                self.nodes = await asyncio.to_thread(count_schedulable_nodes, self._core_v1)
            except Exception as exc:
                # A constant pipeline does not care; a coefficient one starts at one node's
                # worth and grows at the next successful count.
                log.warning("could not count nodes (%s); assuming 1 for now", exc)
                return 1
        return self.nodes

    async def _resize(self, specs: Iterable[PipelineSpec], nodes: int) -> list[str]:
        self.nodes = nodes
        resized = []
        for spec in specs:
            if spec.parallelism_spec.constant or not spec.parallelism_spec.coefficient:
                continue
            try:
                await self._apply_pipeline(spec, nodes=nodes)
            except Exception as exc:
                log.error("could not resize pipeline %r for %d nodes: %s", spec.name, nodes, exc)
                self._retry[spec.name] = spec
                continue
            resized.append(spec.name)
        return resized

    async def _apply_pipeline(self, spec: PipelineSpec, *, nodes: int) -> list[dict[str, Any]]:
        objects = self.render(spec, nodes=nodes)
        for obj in objects:
            await self._request("PATCH", obj, body=obj)
        self.pipelines[spec.name] = spec
        return objects

    async def _delete_pipeline(self, name: str) -> None:
        ref = {"metadata": {"name": worker_name(name), "namespace": self.namespace}}
        # Background: the call returns at once and the garbage collector removes the ReplicaSets
        # and pods; each worker gets SIGTERM and its grace period to hand its datum back.
        options = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        for api_version, kind in reversed(list(_COLLECTIONS)):
            obj = {"apiVersion": api_version, "kind": kind, **ref}
            await self._request("DELETE", obj, body=options, missing_ok=True)
        self.pipelines.pop(name, None)

    async def _request(
        self, method: str, obj: dict[str, Any], *, body: dict[str, Any], missing_ok: bool = False
    ) -> None:
        kind = obj["kind"]
        name = obj["metadata"]["name"]
        path = object_path(
            obj["apiVersion"], kind, namespace=obj["metadata"]["namespace"], name=name
        )
        query: list[tuple[str, str]] = []
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if method == "PATCH":
            # force: the controller is the authority on every field it renders; a field someone
            # changed by hand (kubectl edit) is taken back instead of failing with a conflict.
            query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
            headers["Content-Type"] = APPLY_PATCH
        status, text = await asyncio.to_thread(self._send, method, path, query, headers, body)
        if 200 <= status < 300 or (missing_ok and status == 404):
            return
        raise KubernetesError(_explain(method, kind, name, status, text), status=status)

    def _send(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]],
        headers: dict[str, str],
        body: dict[str, Any],
    ) -> tuple[int, str]:
        serialized = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self._api.call_api(*serialized, _request_timeout=REQUEST_TIMEOUT_SECONDS)
        data = response.read() or b""
        return response.status, data.decode(errors="replace")


def _explain(method: str, kind: str, name: str, status: int, text: str) -> str:
    try:
        detail = json.loads(text).get("message") or text
    except (ValueError, AttributeError):
        detail = text
    what = f"{'apply' if method == 'PATCH' else method.lower()} {kind} {name}: HTTP {status}"
    hint = ""
    if status == 403:
        hint = (
            "; the controller's service account lacks a permission: see Role"
            " datumflow-controller in manifests/rbac.yaml"
        )
    elif status == 404 and kind == "ScaledObject":
        hint = "; the cluster does not know ScaledObject: install KEDA (2.20 or newer) first"
    elif status == 422:
        hint = (
            "; the cluster rejected the rendered object: compare with `datumflow render pipeline`"
        )
    return f"{what}: {detail}{hint}"


def kubernetes_api_client() -> ApiClient:
    """An ApiClient for the controller: the pod's service account in a cluster, else ~/.kube/config.

    A fresh Configuration, so nothing else in the process shares (or changes) it.
    """
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        try:
            config.load_kube_config(client_configuration=configuration)
        except Exception as exc:
            raise KubernetesError(
                "no Kubernetes credentials: not running in a pod, and no usable kubeconfig"
                f" ({exc}); run the controller in the cluster or set KUBECONFIG"
            ) from None
    return client.ApiClient(configuration)
