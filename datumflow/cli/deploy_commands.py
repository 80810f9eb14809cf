"""Commands registered by `register`; see main.py."""

from __future__ import annotations

import typer


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Add this module's commands to the app and to the groups (create, list, inspect, ...)."""
