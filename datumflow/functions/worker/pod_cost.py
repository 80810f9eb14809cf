"""A worker's busy/idle marker: busy pods are expensive to delete, idle ones cheap.

When the HPA lowers a Deployment's replica count, the ReplicaSet controller deletes the pods with the
lowest `controller.kubernetes.io/pod-deletion-cost` first. A worker marks its own pod busy while it
holds a datum and idle between datums, so a scale-down takes idle workers and leaves the busy ones to
finish: the limitation Pachyderm's documentation names for its autoscaling.

Outside Kubernetes the supervisor of `datumflow up` makes the same choice among its worker processes;
a worker tells it through a file that exists while it holds a datum (`BusyFile`).

The marker is best effort. A failed patch is logged and the worker goes on: the worst case is the
one Kubernetes has without it, a busy pod chosen for deletion, which then hands its datum back.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kubernetes.client import CoreV1Api

log = logging.getLogger(__name__)

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
# Any int32 works; only the order matters. Busy far above the default 0, idle below it, so that pods
# that never marked themselves (a worker that failed to patch) sit between the two.
BUSY_COST = "100"
IDLE_COST = "-100"
# The API server answers a pod patch in milliseconds; a worker should not wait longer than this
# before processing its datum because the control plane is slow.
PATCH_TIMEOUT_SECONDS = 5.0


class DeletionCostMarker(Protocol):
    async def busy(self) -> None: ...

    async def idle(self) -> None: ...


class NoPodDeletionCost:
    """Outside Kubernetes (a local worker process) there is no pod to mark."""

    async def busy(self) -> None:
        return None

    async def idle(self) -> None:
        return None


class BusyFile:
    """A local worker's marker: `path` exists while the worker holds a datum.

    The supervisor names the file in DATUMFLOW_BUSY_FILE and reads it when it scales down. A local
    file operation takes microseconds, so it is done inline.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    async def busy(self) -> None:
        try:
            self.path.touch()
        except OSError as exc:
            log.warning("could not mark busy in %s: %s", self.path, exc)

    async def idle(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not mark idle in %s: %s", self.path, exc)


class PodDeletionCost:
    """Patches this worker's own pod annotation, and only when the value changes."""

    def __init__(self, *, pod_name: str, namespace: str, core_v1: CoreV1Api) -> None:
        self.pod_name = pod_name
        self.namespace = namespace
        self._core_v1 = core_v1
        self._current: str | None = None
        # busy() and idle() may be called from different tasks: one patch at a time, so the pod
        # ends with the value asked for last.
        self._lock = asyncio.Lock()

    async def busy(self) -> None:
        await self._mark(BUSY_COST)

    async def idle(self) -> None:
        await self._mark(IDLE_COST)

    async def _mark(self, cost: str) -> None:
        async with self._lock:
            if cost == self._current:
                return
            body = {"metadata": {"annotations": {ANNOTATION: cost}}}
            try:
                await asyncio.to_thread(
                    self._core_v1.patch_namespaced_pod,
                    self.pod_name,
                    self.namespace,
                    body,
                    _content_type="application/merge-patch+json",
                    _request_timeout=PATCH_TIMEOUT_SECONDS,
                )
            except Exception as exc:
                # Not remembered as set: the next call tries again.
                log.warning(
                    "could not set %s=%s on pod %s/%s: %s; scale-down may pick this pod while it"
                    " is busy. Check that the worker's service account may patch pods in its"
                    " namespace (manifests/rbac.yaml, Role datumflow-worker).",
                    ANNOTATION,
                    cost,
                    self.namespace,
                    self.pod_name,
                    exc,
                )
                return
            self._current = cost


def pod_deletion_cost(
    *, pod_name: str | None, namespace: str | None, core_v1: CoreV1Api | None = None
) -> DeletionCostMarker:
    """The marker for this worker: a real one in a pod, a no-op elsewhere.

    `pod_name` and `namespace` come from POD_NAME and POD_NAMESPACE (the Deployment sets them from
    the downward API); the caller reads them. Without `core_v1` the in-cluster service account
    is used; if that fails the worker runs without the marker.
    """
    if not pod_name or not namespace:
        return NoPodDeletionCost()
    if core_v1 is None:
        try:
            core_v1 = in_cluster_core_v1()
        except Exception as exc:
            log.warning(
                "running in pod %s/%s but cannot reach the Kubernetes API (%s); pod deletion"
                " cost will not be set. Is automountServiceAccountToken disabled?",
                namespace,
                pod_name,
                exc,
            )
            return NoPodDeletionCost()
    return PodDeletionCost(pod_name=pod_name, namespace=namespace, core_v1=core_v1)


def worker_marker(
    *, pod_name: str | None, namespace: str | None, busy_file: str | None
) -> DeletionCostMarker:
    """The busy/idle marker for a worker: its pod's deletion cost in Kubernetes (POD_NAME and
    POD_NAMESPACE set), the supervisor's busy file locally (DATUMFLOW_BUSY_FILE set), else none."""
    if pod_name and namespace:
        return pod_deletion_cost(pod_name=pod_name, namespace=namespace)
    if busy_file:
        return BusyFile(Path(busy_file))
    return NoPodDeletionCost()


def in_cluster_core_v1() -> CoreV1Api:
    """A CoreV1Api from the pod's service account, without touching the client's global config."""
    # Imported here: a local worker never needs the Kubernetes client, so it does not load it.
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_incluster_config(client_configuration=configuration)
    return client.CoreV1Api(client.ApiClient(configuration))
