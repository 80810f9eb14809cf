"""The worker processes of one pipeline under `datumflow up`, and the scaler that sizes them.

How many workers a pipeline gets follows KEDA's rule (datumflow.scaling) from its consumer's lag;
on a scale-down idle workers go first, and a stopping worker gets a grace period to finish its
datum, as a pod gets from the kubelet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from datumflow.broker.records import PipelineInfo
from datumflow.errors import SpecError
from datumflow.runtime.child import Child
from datumflow.scaling import (
    Scaler,
    ScalingError,
    ScalingParams,
    drain_seconds,
    params_for,
    termination_grace_seconds,
)
from datumflow.spec import PipelineSpec, parse_duration

T = TypeVar("T")


# A worker told to stop (scale-down, pipeline deleted) that is still alive this long after its
# SIGTERM is killed, as the kubelet does after terminationGracePeriodSeconds.
def kill_deadline(grace: float) -> float:
    return time.monotonic() + termination_grace_seconds(grace)


def worker_grace(spec: PipelineSpec, *, cap: float) -> float:
    """Seconds a terminating worker of `spec` may keep working on its datum before handing it back.

    `scaling.drain_seconds` (the datum_timeout, which bounds a datum anyway) as in a pod, capped by
    the local `grace` setting: on a laptop a scale-down or a Ctrl-C should not wait 30 s.
    """
    try:
        timeout = parse_duration(spec.datum_timeout, field="datum_timeout")
    except SpecError:
        timeout = None
    return min(cap, drain_seconds(timeout))


def choose_to_stop(workers: Sequence[T], count: int, *, busy: Callable[[T], bool]) -> list[T]:
    """The `count` workers to stop on a scale-down: idle ones first, then the newest.

    Stopping an idle worker costs nothing; stopping a busy one costs its datum's work so far, or the
    grace period it takes to finish. The local form of the pod-deletion-cost annotation.
    """
    newest_first = list(reversed(workers))
    # A stable sort keeps newest-first among equals.
    return sorted(newest_first, key=busy)[: max(count, 0)]


class PipelineWorkers:
    """The worker processes of one pipeline and the scaler that sizes them."""

    def __init__(self, info: PipelineInfo, *, grace_cap: float, previous: PipelineWorkers | None):
        self.info = info
        self.error = ""
        self.params: ScalingParams | None = None
        self.scaler: Scaler | None = None
        try:
            self.params = params_for(info.spec, nodes=1, place="local")
        except ScalingError as exc:
            self.error = str(exc)
        self.grace = worker_grace(info.spec, cap=grace_cap)
        self.workers: list[Child] = []
        self.draining: list[Child] = []
        self.desired = 0
        self.lag: int | None = None
        self.next_poll = 0.0
        if previous is not None:
            # A new version of the pipeline: the running workers read the new spec with their
            # next datum, so they stay; so does the scaler's memory (cooldown, recent counts)
            # unless the scaling numbers themselves changed.
            self.workers, self.draining = previous.workers, previous.draining
            self.desired, self.lag = previous.desired, previous.lag
            if previous.params == self.params:
                self.scaler = previous.scaler
        if self.scaler is None and self.params is not None:
            self.scaler = Scaler(self.params)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def running(self) -> int:
        return sum(1 for w in self.workers if w.alive)

    @property
    def state(self) -> str:
        if self.error:
            return "failure"
        autoscaled = self.params is not None and self.params.autoscaled
        if autoscaled and self.desired == 0 and self.running == 0:
            return "standby"
        return "running"

    def free_index(self) -> int:
        # The lowest number no live worker of this pipeline uses: log files stay few and stable.
        used = {w.index for w in self.workers + self.draining}
        return next(i for i in range(len(used) + 1) if i not in used)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "workers": self.running,
            "desired": self.desired,
            "lag": self.lag,
            "draining": sum(1 for w in self.draining if w.alive),
            "max_workers": self.params.max_replicas if self.params else None,
            "autoscaling": self.params.autoscaled if self.params else self.info.spec.autoscaled,
            "reason": self.error,
            "updated": time.time(),
        }
