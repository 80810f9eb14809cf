"""The files `datumflow up`'s processes record their metrics into, and what becomes of a process's
files once it is gone.

Under `up` each process writes files of its own, `<kind>_<pid>.db` (prometheus-client's
multiprocess mode), and `up` serves the sum of them all. A process's counts must outlive it (a
counter that drops when a worker exits reads as a reset), so its files were kept; but a machine
whose pipelines scale from zero and back all day would gather thousands, and every scrape reads
every one. So the files of a process gone are folded into one archive file per kind
(`counter_archive.db`, ...): counts and histograms added up, the latest value of a `mostrecent`
gauge kept; its live gauges (`livesum`, `liveall`) are dropped, as prometheus-client's
`mark_process_dead` does. Gauges of other modes (none of datumflow's) are left as they are.

A scrape and a fold take turns: a scrape that listed the files before a fold and read them after
would find some gone (prometheus-client fails the scrape then), or read a process's values both
in its own file and in the archive.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

Value = tuple[float, float]
"""A sample's value and timestamp."""


def _add(old: Value, new: Value) -> Value:
    return old[0] + new[0], max(old[1], new[1])


def _latest(old: Value, new: Value) -> Value:
    return new if new[1] >= old[1] else old


FOLDS: dict[str, Callable[[Value, Value], Value]] = {
    "counter": _add,
    "histogram": _add,
    "gauge_mostrecent": _latest,
}
"""How the values of processes gone are folded together, by kind (the file name's prefix)."""
DROPPED = ("gauge_livesum", "gauge_liveall")
"""Kinds that count live processes only: a process's files of these go with it."""
ARCHIVE = "archive"
"""What stands for the process id in an archive file's name."""


class MetricsFiles:
    """The directory every process under `up` records into."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._turn = threading.Lock()

    def collector(self, registry: CollectorRegistry) -> None:
        """Serve the directory's values through `registry`, a scrape at a time with the folds."""
        from prometheus_client.multiprocess import MultiProcessCollector

        turn = self._turn

        class Collector(MultiProcessCollector):
            def collect(self) -> Any:
                with turn:
                    return super().collect()  # type: ignore[no-untyped-call]

        Collector(registry, path=str(self.path))  # type: ignore[no-untyped-call]

    def fold_gone(self, *, alive: set[int]) -> int:
        """Fold the files of every process that recorded some and is neither among `alive` nor
        this one, however briefly it lived; the number of files folded or dropped."""
        own = os.getpid()
        gone: dict[str, list[Path]] = {}
        for path in self.path.glob("*.db"):
            kind, _, pid = path.name[: -len(".db")].rpartition("_")
            if pid.isdigit() and int(pid) not in alive and int(pid) != own:
                gone.setdefault(kind, []).append(path)
        if not gone:
            return 0
        with self._turn:
            for kind, paths in gone.items():
                if kind in DROPPED:
                    pass
                elif kind in FOLDS:
                    self._fold(kind, paths, FOLDS[kind])
                else:
                    continue  # a kind left as it is
                for path in paths:
                    path.unlink(missing_ok=True)
        return sum(len(paths) for paths in gone.values())

    def _fold(self, kind: str, paths: list[Path], fold: Callable[[Value, Value], Value]) -> None:
        from prometheus_client.mmap_dict import MmapedDict

        archive = self.path / f"{kind}_{ARCHIVE}.db"
        values: dict[str, Value] = {}
        for path in [archive, *paths] if archive.exists() else paths:
            read = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
            for key, value, timestamp, _ in read:
                new = (value, timestamp)
                values[key] = fold(values[key], new) if key in values else new
        # Written aside, then put in place in one rename: a scrape never finds half an archive.
        written = self.path / f"{kind}_{ARCHIVE}.db.new"
        written.unlink(missing_ok=True)
        archived = MmapedDict(str(written))  # type: ignore[no-untyped-call]
        try:
            for key, (value, timestamp) in values.items():
                archived.write_value(key, value, timestamp)  # type: ignore[no-untyped-call]
        finally:
            archived.close()  # type: ignore[no-untyped-call]
        os.replace(written, archive)
