"""Settings: one Struct, built once at the entry point and passed explicitly.

Nothing here reads the environment at import time; `Settings.from_env` is called by the CLI and by
`datumflow worker`, never by library code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, get_args, get_origin

import msgspec

PfsMode = Literal["auto", "namespace", "direct", "env"]
"""How a worker lays out /pfs (see Settings.pfs_mode)."""

SECRET_FIELDS = frozenset({"nats_password", "nats_token", "nats_nkey_seed"})
"""Settings whose values are secrets (the others name files or places, which are not)."""


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    home: str = ".datumflow"
    """State directory: embedded broker data, logs, the local object store, scratch space."""
    nats_url: str = ""
    """Broker to use; empty means the embedded one recorded in `home`."""
    monitor_url: str = ""
    """nats-server HTTP monitoring endpoint (host:port), where `up` reads lag as KEDA does; empty
    (an external broker without one): `up` reads the same figure from JetStream consumer info."""
    storage: str = ""
    """Object store URL: file:///path or s3://bucket/prefix. Empty means `<home>/objects`."""
    replicas: int = 1
    """Copies the broker keeps of every stream, bucket and durable consumer datumflow declares:
    1 on a single nats-server, 3 on a cluster of three that should survive losing one node."""
    ack_wait: float = 30.0
    """Seconds a worker may hold a datum without a heartbeat before it is redelivered."""
    nats_user: str = ""
    nats_password: str = ""
    nats_token: str = ""
    nats_creds: str = ""
    nats_nkey_seed: str = ""
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""
    pfs_mode: PfsMode = "auto"
    """How a worker lays out /pfs: "namespace" (a private bind mount per datum, Linux as root),
    "direct" (the worker owns /pfs, as in a pod), "env" (a directory named in $PFS), or "auto"."""
    grace: float = 20.0
    """Seconds a worker told to stop may spend finishing its datum before handing it back."""
    user_code_user: str = ""
    """A user (name or uid) to run `transform.cmd` as when the worker runs as root, so that user
    code cannot read the worker's credentials from /proc. `up --secure` sets "nobody" unless
    this is given. Empty: user code runs as the worker's own user."""
    s3_endpoint: str = ""
    s3_region: str = ""
    storage_faults: str = ""
    """Testing only: latency, errors and crashes injected into the object store of every function
    (see datumflow.storage.faulty), e.g. "latency=0.02,jitter=0.05,errors=0.1". Empty: none."""

    def __repr__(self) -> str:
        # Settings end up in tracebacks and debug lines: never with their secrets.
        shown = []
        for field in msgspec.structs.fields(self):
            value = getattr(self, field.name)
            if value == field.default:
                continue
            if field.name in SECRET_FIELDS:
                value = "***"
            shown.append(f"{field.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    def __post_init__(self) -> None:
        # A Struct made in code is not type-checked by msgspec: a closed set must be enforced here
        # too, or a typo would behave as the default.
        for field in msgspec.structs.fields(self):
            allowed = _choices(field.type)
            value = getattr(self, field.name)
            if allowed and value not in allowed:
                raise ValueError(_not_one_of(field.name, value, allowed))
        if not 1 <= self.replicas <= 5:
            raise ValueError(
                f"DATUMFLOW_REPLICAS={self.replicas}: JetStream keeps 1 to 5 replicas of a stream"
            )

    @property
    def home_path(self) -> Path:
        return Path(self.home).resolve()

    def storage_url(self) -> str:
        return self.storage or (self.home_path / "objects").as_uri()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from DATUMFLOW_* variables; explicit overrides (CLI flags) win."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for field in msgspec.structs.fields(cls):
            raw = env.get("DATUMFLOW_" + field.name.upper())
            if raw is None or raw == "":
                continue
            allowed = _choices(field.type)
            if allowed and raw not in allowed:
                raise ValueError(_not_one_of(field.name, raw, allowed))
            if field.type in (float, "float"):
                try:
                    values[field.name] = float(raw)
                except ValueError:
                    raise ValueError(
                        f"bad datumflow setting DATUMFLOW_{field.name.upper()}={raw!r}: expected a number"
                    ) from None
            elif field.type in (int, "int"):
                try:
                    values[field.name] = int(raw)
                except ValueError:
                    raise ValueError(
                        f"bad datumflow setting DATUMFLOW_{field.name.upper()}={raw!r}: expected a whole number"
                    ) from None
            else:
                values[field.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(values, cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"bad datumflow setting: {exc}") from None

    def secret_env(self) -> dict[str, str]:
        """The settings as DATUMFLOW_* variables, for child processes of datumflow itself."""
        out = {}
        for field in msgspec.structs.fields(self):
            value = getattr(self, field.name)
            if value not in ("", None):
                out["DATUMFLOW_" + field.name.upper()] = str(value)
        return out


def _choices(annotation: object) -> tuple[str, ...]:
    """The values a Literal setting may take; () for any other."""
    return get_args(annotation) if get_origin(annotation) is Literal else ()


def _not_one_of(name: str, value: object, allowed: tuple[str, ...]) -> str:
    return (
        f"bad datumflow setting DATUMFLOW_{name.upper()}={value!r}: it must be one of"
        f" {', '.join(allowed)}"
    )
