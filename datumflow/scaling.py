"""The autoscaling numbers, in one place: lag, the parallelism limit, KEDA's rule, the drain time.

The local scaler runs `Scaler` against the lag it reads from the embedded nats-server; the Kubernetes
renderer writes the same `ScalingParams` into a KEDA ScaledObject, whose `nats-jetstream` trigger and
HPA apply the same rule. Both read their numbers from `params_for`, so a pipeline scales the same way
on a laptop and in a cluster (only the tempo differs, see `_DEFAULTS`).

This module is pure: no broker, no Kubernetes client, and not even the spec module (the import
contract keeps the bottom layer's modules independent), so it reads a spec through `ScalableSpec`,
a protocol that `datumflow.spec.PipelineSpec` satisfies.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Literal, Protocol

import msgspec

Place = Literal["local", "kubernetes"]


class _Parallelism(Protocol):
    @property
    def constant(self) -> int: ...

    @property
    def coefficient(self) -> float: ...


class _Overrides(Protocol):
    @property
    def lag_threshold(self) -> int | None: ...

    @property
    def activation_lag_threshold(self) -> int | None: ...

    @property
    def cooldown_period(self) -> float | None: ...

    @property
    def polling_interval(self) -> float | None: ...


class ScalableSpec(Protocol):
    """What scaling needs from a pipeline spec; `datumflow.spec.PipelineSpec` has all of it."""

    @property
    def parallelism_spec(self) -> _Parallelism: ...

    @property
    def autoscaled(self) -> bool: ...

    @property
    def scaling(self) -> _Overrides | None: ...


class ScalingError(ValueError):
    """A scaling override is out of range; the message names the spec field."""


class ScalingParams(msgspec.Struct, frozen=True, kw_only=True):
    """KEDA's knobs for one pipeline in one place. Durations are seconds."""

    lag_threshold: int
    """Target lag per worker: replicas = ceil(lag / lag_threshold)."""
    activation_lag_threshold: int
    """The pipeline leaves standby only when lag is above this."""
    cooldown_period: float
    """Seconds without activity before an autoscaled pipeline goes back to zero workers."""
    polling_interval: float
    """Seconds between two readings of the lag."""
    min_replicas: int
    max_replicas: int
    scale_down_window: float
    """Seconds of recommendations whose highest wins on the way down (the HPA's stabilization
    window): a short dip in lag does not kill workers that the next poll would start again."""

    @property
    def autoscaled(self) -> bool:
        return self.min_replicas == 0


class _Defaults(msgspec.Struct, frozen=True, kw_only=True):
    polling_interval: float
    cooldown_period: float
    scale_down_window: float


# Lag counts datum messages not yet acknowledged (num_pending + num_ack_pending): a datum each for
# a command, a datum set for an in-process function (functions.datum_sets), whose job ends in sets
# small enough that each of its workers gets some. A target of 1 therefore asks for one worker per
# outstanding message, up to the parallelism limit: Pachyderm's min(pending tasks, parallelism),
# followed in both directions.
# Pipelines with many tiny datums, where starting a worker costs more than a datum, raise it with
# `scaling.lag_threshold`.
DEFAULT_LAG_THRESHOLD = 1
# One waiting datum is enough to leave standby: that is the point of scaling from zero.
DEFAULT_ACTIVATION_LAG_THRESHOLD = 0

_DEFAULTS: dict[Place, _Defaults] = {
    # A local worker is a process that starts in well under a second, and reading /jsz on
    # localhost is cheap: poll every second and give workers back after 10 idle seconds.
    "local": _Defaults(polling_interval=1.0, cooldown_period=10.0, scale_down_window=5.0),
    # A pod needs an image pull and a scheduler decision, and KEDA polls every ScaledObject in
    # the cluster: poll every 5 s, keep a warm worker for a minute after the last datum (the next
    # commit often follows soon), and hold a lower replica count for 30 s before acting on it.
    "kubernetes": _Defaults(polling_interval=5.0, cooldown_period=60.0, scale_down_window=30.0),
}

# When a worker is told to stop (SIGTERM), it keeps working on the datum in hand for this long and
# then hands it back with a nak. Without a datum_timeout we cannot know how long a datum takes; 30 s
# matches Kubernetes' own default grace period.
DEFAULT_DRAIN_SECONDS = 30.0
# A datum_timeout of hours would hold a node drain for hours; past this, hand the datum back.
MAX_DRAIN_SECONDS = 900.0
# After the drain: nak or ack, publish the result, close the NATS connection, flush the logs.
SHUTDOWN_MARGIN_SECONDS = 15.0


def max_workers(spec: ScalableSpec, *, nodes: int) -> int:
    """The parallelism limit: `constant`, or ceil(`coefficient` * nodes); never below 1."""
    p = spec.parallelism_spec
    if p.constant > 0:
        return p.constant
    if p.coefficient > 0:
        # Round before ceil: 0.1 * 30 is 3.0000000000000004 in binary floating point, which is
        # 3 workers, not 4.
        return max(1, math.ceil(round(p.coefficient * max(nodes, 0), 9)))
    return 1


def params_for(spec: ScalableSpec, *, nodes: int, place: Place) -> ScalingParams:
    """The scaling numbers for `spec` on `place`, with `spec.scaling` overriding the defaults."""
    d = _DEFAULTS[place]
    o = spec.scaling
    limit = max_workers(spec, nodes=nodes)
    lag_threshold = _override(o, "lag_threshold", DEFAULT_LAG_THRESHOLD)
    activation = _override(o, "activation_lag_threshold", DEFAULT_ACTIVATION_LAG_THRESHOLD)
    cooldown = _override(o, "cooldown_period", d.cooldown_period)
    polling = _override(o, "polling_interval", d.polling_interval)
    if lag_threshold < 1:
        raise ScalingError(
            f"scaling.lag_threshold: must be >= 1 (datums per worker), got {lag_threshold}"
        )
    if activation < 0:
        raise ScalingError(f"scaling.activation_lag_threshold: must be >= 0, got {activation}")
    if cooldown < 0:
        raise ScalingError(f"scaling.cooldown_period: must be >= 0 seconds, got {cooldown}")
    if polling <= 0:
        raise ScalingError(f"scaling.polling_interval: must be > 0 seconds, got {polling}")
    return ScalingParams(
        lag_threshold=int(lag_threshold),
        activation_lag_threshold=int(activation),
        cooldown_period=float(cooldown),
        polling_interval=float(polling),
        min_replicas=0 if spec.autoscaled else limit,
        max_replicas=limit,
        scale_down_window=d.scale_down_window,
    )


def _override(overrides: _Overrides | None, name: str, default: Any) -> Any:
    # None means "not set"; an explicit 0 is an override (and then checked like any other value).
    value = getattr(overrides, name, None) if overrides is not None else None
    return default if value is None else value


def lag_from_jsz(
    jsz: dict[str, Any], *, stream: str, consumer: str, account: str | None = None
) -> int | None:
    """num_pending + num_ack_pending of a durable consumer in a `/jsz?consumers=true` document.

    This is the number KEDA's `nats-jetstream` scaler reads. None when the account, stream or
    consumer is not in the document (not created yet, or deleted): the caller decides what that
    means, and must not read it as the whole stream as KEDA before 2.20 did.
    """
    for acc in jsz.get("account_details") or []:
        if account is not None and acc.get("name") != account:
            continue
        for st in acc.get("stream_detail") or []:
            if st.get("name") != stream:
                continue
            for c in st.get("consumer_detail") or []:
                if c.get("name") == consumer:
                    return int(c.get("num_pending") or 0) + int(c.get("num_ack_pending") or 0)
    return None


def drain_seconds(datum_timeout: float | None) -> float:
    """How long a terminating worker may keep working on its datum before handing it back.

    With a datum_timeout the datum ends (done or timed out) within it, so waiting longer is useless.
    """
    if datum_timeout is None or datum_timeout <= 0:
        return DEFAULT_DRAIN_SECONDS
    return min(datum_timeout, MAX_DRAIN_SECONDS)


def termination_grace_seconds(drain: float) -> int:
    """The pod's terminationGracePeriodSeconds for a worker that drains for `drain` seconds:
    the drain plus the time to hand the datum back and shut down."""
    return math.ceil(drain + SHUTDOWN_MARGIN_SECONDS)


class Scaler:
    """KEDA's rule as a pure state machine: feed it the lag and the time, it says how many workers.

    - Active when lag > activation_lag_threshold; that instant is remembered.
    - Autoscaled: 0 workers until the first activity, and again once `cooldown_period` has passed
      since the last activity (standby). In between, ceil(lag / lag_threshold) clamped to
      [1, max]: the HPA never goes below one replica, scaling to zero is KEDA's job.
    - Not autoscaled: min = max = parallelism, always.
    - On the way down the highest recommendation of the last `scale_down_window` seconds wins, as
      with the HPA's stabilization window; on the way up the new number applies at once.
    """

    def __init__(self, params: ScalingParams) -> None:
        self.params = params
        self._last_active: float | None = None
        self._recent: deque[tuple[float, int]] = deque()

    def desired(self, lag: int, now: float) -> int:
        p = self.params
        if not p.autoscaled:
            return p.max_replicas
        if lag > p.activation_lag_threshold:
            self._last_active = now
        if self._last_active is None or now - self._last_active >= p.cooldown_period:
            # Standby: forget the history so that waking up starts from what the lag asks.
            self._recent.clear()
            return 0
        wanted = math.ceil(max(lag, 0) / p.lag_threshold)
        wanted = min(max(wanted, 1), p.max_replicas)
        self._recent.append((now, wanted))
        while self._recent and self._recent[0][0] < now - p.scale_down_window:
            self._recent.popleft()
        return max(n for _, n in self._recent)
