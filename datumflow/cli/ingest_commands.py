"""`datumflow ingest`: the function that turns bucket notifications into commits."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import typer

from datumflow.broker.connection import Broker
from datumflow.broker.lease import Lease
from datumflow.cli.context import fail, settings_of
from datumflow.errors import DatumflowError
from datumflow.functions.ingest import Ingest, IngestOptions
from datumflow.pfs.bucket_sources import check_subject
from datumflow.runtime.leader import lead
from datumflow.runtime.service import resolve, serve
from datumflow.storage import ObjectStore


def ingest(
    ctx: typer.Context,
    window: float | None = typer.Option(
        None,
        "--window",
        help="Seconds to gather a burst of notifications into one commit"
        " [default: DATUMFLOW_INGEST_WINDOW, else 1]",
    ),
    subject: Annotated[
        list[str] | None,
        typer.Option(
            "--subject",
            help="A NATS subject notifications arrive on, besides df.ingest.> and the subjects"
            " of the bucket mappings (repeat; default: DATUMFLOW_INGEST_SUBJECTS, comma-separated).",
        ),
    ] = None,
    max_batch: int = typer.Option(
        5_000, "--max-batch", help="Notifications in one commit at most."
    ),
) -> None:
    """Run the ingest function (bucket notifications → commits)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = settings_of(ctx)
    if window is None:
        window = settings.ingest_window
    given = subject or [settings.ingest_subjects]
    subjects = tuple(s.strip() for item in given for s in item.split(",") if s.strip())
    try:
        for s in subjects:
            check_subject(s)
        options = IngestOptions(window=window, max_batch=max_batch, subjects=subjects)
    except DatumflowError as exc:
        fail(str(exc))
    if window <= 0 or max_batch < 1:
        fail("--window must be above 0 and --max-batch at least 1")
    settings = resolve(settings)

    async def body(broker: Broker, store: ObjectStore, stop: asyncio.Event) -> None:
        # Active/standby: any number run, the one holding the lease ingests.
        async def term(lease: Lease, until: asyncio.Event) -> None:
            await Ingest(broker=broker, store=store, options=options, lease=lease).run(until)

        await lead(lease=Lease(broker, name="ingest"), stop=stop, body=term)

    asyncio.run(serve(settings=settings, name="datumflow-ingest", body=body))
