"""Kubernetes: `datumflow render pipeline` for kubectl, and `datumflow controller` in the cluster."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from datumflow import metrics
from datumflow.cli.context import fail, settings_of
from datumflow.deploy.controller import Controller, kubernetes_api_client
from datumflow.deploy.render import DEFAULT_MONITOR_ENDPOINT, render_pipeline, render_yaml
from datumflow.deploy.watch import DEFAULT_RESYNC_INTERVAL, pipeline_events
from datumflow.errors import DatumflowError
from datumflow.pfs.datums import check_input
from datumflow.runtime.service import connect_patiently, resolve, stop_on_signals
from datumflow.settings import Settings
from datumflow.spec import PipelineSpec, load_spec

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

DEFAULT_NAMESPACE = "datumflow"


def _monitor_endpoint(settings: Settings, explicit: str) -> str:
    # The endpoint KEDA reaches from inside the cluster. Only an explicit one counts: the monitor
    # address of a local `datumflow up` (127.0.0.1:port) means nothing to KEDA.
    return explicit or settings.monitor_url or DEFAULT_MONITOR_ENDPOINT


def _read_spec(file: str) -> PipelineSpec:
    try:
        data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        fail(f"{file}: {exc.strerror or exc}")
    try:
        spec = load_spec(data, source="stdin" if file == "-" else file)
        check_input(spec.input)
    except DatumflowError as exc:
        fail(str(exc))
    return spec


def render_pipeline_command(
    ctx: typer.Context,
    file: str = typer.Option(..., "--file", "-f", help="Spec, JSON or YAML; - reads stdin."),
    namespace: str = typer.Option(DEFAULT_NAMESPACE, "--namespace", "-n"),
    image: str = typer.Option(
        "", "--image", help="Worker image [default: the spec's transform.image, else datumflow's]"
    ),
    nodes: int = typer.Option(
        1, "--nodes", min=1, help="Schedulable nodes, for a parallelism_spec.coefficient."
    ),
    monitor_endpoint: str = typer.Option(
        "",
        "--monitor-endpoint",
        help="host:port of NATS monitoring for KEDA"
        f" [default: DATUMFLOW_MONITOR_URL, else {DEFAULT_MONITOR_ENDPOINT}]",
    ),
    trigger_authentication: str = typer.Option(
        "", "--trigger-authentication", help="A KEDA TriggerAuthentication to reference."
    ),
) -> None:
    """Print a pipeline's worker Deployment and KEDA ScaledObject as YAML, for `kubectl apply -f -`.

    Nothing is read from a cluster: the output depends only on the spec and these options.
    """
    spec = _read_spec(file)
    try:
        objects = render_pipeline(
            spec,
            namespace=namespace,
            image=image or None,
            nodes=nodes,
            monitor_endpoint=_monitor_endpoint(settings_of(ctx), monitor_endpoint),
            trigger_authentication=trigger_authentication or None,
        )
    except DatumflowError as exc:
        fail(str(exc))
    sys.stdout.write(render_yaml(objects))


def controller_command(
    ctx: typer.Context,
    namespace: str = typer.Option(
        "",
        "--namespace",
        "-n",
        help="Namespace of the worker Deployments and ScaledObjects"
        f" [default: POD_NAMESPACE (in a pod: its own), else {DEFAULT_NAMESPACE}]",
    ),
    image: str = typer.Option(
        "",
        "--image",
        envvar="DATUMFLOW_WORKER_IMAGE",
        help="Image of workers whose spec names no transform.image.",
    ),
    trigger_authentication: str = typer.Option(
        "",
        "--trigger-authentication",
        envvar="DATUMFLOW_TRIGGER_AUTHENTICATION",
        help="KEDA TriggerAuthentication every ScaledObject references (the keda/ component).",
    ),
    monitor_endpoint: str = typer.Option(
        "",
        "--monitor-endpoint",
        help="host:port of NATS monitoring for KEDA"
        f" [default: DATUMFLOW_MONITOR_URL, else {DEFAULT_MONITOR_ENDPOINT}]",
    ),
    node_check_interval: float = typer.Option(
        30.0, "--node-check-interval", min=1.0, help="Seconds between two node counts."
    ),
) -> None:
    """Keep every pipeline's worker Deployment and ScaledObject applied (runs in the cluster)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = settings_of(ctx)
    try:
        api_client = kubernetes_api_client()
    except DatumflowError as exc:
        fail(str(exc))

    async def main() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        await run_controller(
            settings=resolve(settings),
            api_client=api_client,
            stop=stop,
            namespace=namespace or settings.pod_namespace or DEFAULT_NAMESPACE,
            image=image or None,
            monitor_endpoint=_monitor_endpoint(settings, monitor_endpoint),
            trigger_authentication=trigger_authentication or None,
            node_check_interval=node_check_interval,
        )

    asyncio.run(main())


async def run_controller(
    *,
    settings: Settings,
    api_client: ApiClient,
    stop: asyncio.Event,
    namespace: str,
    image: str | None = None,
    monitor_endpoint: str = DEFAULT_MONITOR_ENDPOINT,
    trigger_authentication: str | None = None,
    node_check_interval: float = 30.0,
    resync_interval: float = DEFAULT_RESYNC_INTERVAL,
) -> None:
    """The controller's body: the pipelines bucket's events into `Controller.run`, until `stop`."""
    controller = Controller(
        api_client=api_client,
        namespace=namespace,
        image=image,
        monitor_endpoint=monitor_endpoint,
        trigger_authentication=trigger_authentication,
        node_check_interval=node_check_interval,
    )
    metrics.install(settings)
    # Patient: the controller may start before NATS in a fresh cluster.
    broker = await connect_patiently(settings=settings, name="datumflow-controller", patience=600)
    try:
        events = pipeline_events(broker, stop=stop, resync_interval=resync_interval)
        await controller.run(events)
    finally:
        await broker.close()
