"""What is measured: the scenarios of issue 7 and the shape of one measurement."""

from __future__ import annotations

import msgspec


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    """Also the datumflow pipeline name and the Celery queue."""
    title: str
    kind: str
    """A key of bench.work.KINDS."""
    datums: int
    workers: int
    seconds_each: float = 0.0
    """Work per datum, for the ideal makespan (datums * seconds_each / workers)."""

    @property
    def ideal(self) -> float:
        return self.datums * self.seconds_each / self.workers


class Measure(msgspec.Struct, kw_only=True):
    system: str
    scenario: str
    datums: int
    seconds: float
    """Wall time from submitting the work to the last datum done (datumflow: the job finished)."""
    ok: bool = True
    note: str = ""
    peak_mb: float = 0.0
    """Planning only: the planner's peak resident memory."""
    extra: dict[str, float] = {}

    @property
    def rate(self) -> float:
        return self.datums / self.seconds if self.seconds > 0 else 0.0


def scenarios(scale: float = 1.0) -> list[Scenario]:
    def n(count: int) -> int:
        return max(int(count * scale), 8)

    return [
        Scenario(key="noop", title="no-op datums", kind="noop", datums=n(10_000), workers=2),
        Scenario(key="cpu", title="10 ms CPU datums", kind="cpu", datums=n(2_000), workers=2),
        Scenario(
            key="sleep",
            title="100 ms sleep datums",
            kind="sleep",
            datums=n(400),
            workers=8,
            seconds_each=0.100,
        ),
    ]


PLANNING_FILES = 100_000
PLANNING_BIG = 1_000_000
