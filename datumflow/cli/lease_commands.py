"""`datumflow list lease`: which replica of each active/standby function is the active one."""

from __future__ import annotations

import msgspec
import typer

from datumflow.broker.lease import holders
from datumflow.cli.context import Api, ago, emit_json, run, settings_of, table, with_api


def list_lease(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """List the active replica of the committer and of ingest (the holders of their leases)."""
    settings = settings_of(ctx)

    async def body(api: Api) -> None:
        leases = sorted((await holders(api.broker)).items())
        if as_json:
            emit_json(
                [
                    {"function": name, "revision": revision, **msgspec.to_builtins(info)}
                    for name, (info, revision) in leases
                ]
            )
            return
        table(
            ["FUNCTION", "HOST", "PID", "SINCE", "HOLDER"],
            [
                (name, info.host, info.pid, ago(info.since), info.holder)
                for name, (info, _) in leases
            ],
        )

    run(with_api(settings, body))
