"""The metrics files of processes gone under `datumflow up` (datumflow.metrics_files): folded into
one archive per kind, they read as they did, and a scrape never sees a fold half done. The values
are written by real processes through prometheus-client, and read back through its collector."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry

from datumflow.metrics_files import MetricsFiles

RECORD = """
import os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from prometheus_client import Counter, Gauge, Histogram
n = int(sys.argv[2])
Counter("t_datums", "Datums.", ["pipeline"]).labels(pipeline="p").inc(n)
Histogram("t_seconds", "Seconds.", ["pipeline"], buckets=(1.5, 10.0)).labels(pipeline="p").observe(n)
Gauge("t_last", "Last.", ["pipeline"], multiprocess_mode="mostrecent").labels(pipeline="p").set(n)
Gauge("t_busy", "Busy.", ["pipeline"], multiprocess_mode="livesum").labels(pipeline="p").set(1)
print("recorded", flush=True)
sys.stdin.read()  # until told to go
"""


def record(directory: Path, n: int) -> subprocess.Popen[str]:
    """A process that records `n` and lives until its stdin is closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", RECORD, str(directory), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "recorded\n"
    return proc


def gone(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0


def scrape(files: MetricsFiles) -> dict[str, float]:
    registry = CollectorRegistry()
    files.collector(registry)
    return {
        sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items())): sample.value
        for family in registry.collect()
        for sample in family.samples
    }


def test_the_files_of_processes_gone_fold_into_one_archive_and_read_the_same(
    tmp_path: Path,
) -> None:
    files = MetricsFiles(tmp_path)
    gone(record(tmp_path, 1))
    gone(record(tmp_path, 2))
    alive = record(tmp_path, 4)
    try:
        before = scrape(files)
        assert before["t_busy,pipeline=p"] == 3  # prometheus-client counts the dead in, until told
        assert files.fold_gone(alive={alive.pid}) == 8  # two processes, four files each
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [
                "counter_archive.db",
                "histogram_archive.db",
                "gauge_mostrecent_archive.db",
                *(f"{kind}_{alive.pid}.db" for kind in ("counter", "histogram")),
                *(f"gauge_{mode}_{alive.pid}.db" for mode in ("mostrecent", "livesum")),
            ]
        )
        after = scrape(files)
        # Counts and histograms add up as before; the busy gauge counts the living only.
        assert after == {**before, "t_busy,pipeline=p": 1}
        assert after["t_datums_total,pipeline=p"] == 7
        assert after["t_seconds_bucket,le=1.5,pipeline=p"] == 1
        assert after["t_seconds_count,pipeline=p"] == 3
        assert after["t_last,pipeline=p"] == 4  # the most recent value, the living one's
    finally:
        gone(alive)
    # The last process goes too: folded into the archive there is.
    assert files.fold_gone(alive=set()) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "counter_archive.db",
        "gauge_mostrecent_archive.db",
        "histogram_archive.db",
    ]
    last = scrape(files)
    assert last["t_datums_total,pipeline=p"] == 7 and last["t_last,pipeline=p"] == 4
    assert "t_busy,pipeline=p" not in last
    assert files.fold_gone(alive=set()) == 0


def test_a_scrape_never_sees_a_fold_half_done(tmp_path: Path) -> None:
    """Files of processes gone keep coming while scrapes run: every scrape succeeds, and the
    count it reads never goes back (a scrape that read a file and the archive it was folded
    into would count it twice, then once)."""
    files = MetricsFiles(tmp_path)
    gone(record(tmp_path, 1))
    [model] = tmp_path.glob("counter_*.db")
    counts = model.read_bytes()
    totals: list[float] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def scraping() -> None:
        while not done.is_set():
            try:
                totals.append(scrape(files).get("t_datums_total,pipeline=p", 0.0))
            except BaseException as exc:  # any failure is the test's finding
                failures.append(exc)

    scraper = threading.Thread(target=scraping)
    scraper.start()
    try:
        for round_ in range(40):
            for i in range(3):  # pids no process has (above the kernel's pid_max)
                aside = tmp_path / "copy"
                aside.write_bytes(counts)
                aside.rename(tmp_path / f"counter_{5_000_000 + round_ * 3 + i}.db")
            files.fold_gone(alive=set())
    finally:
        done.set()
        scraper.join()
    assert not failures, failures[0]
    assert len(totals) > 10
    assert all(a <= b for a, b in itertools.pairwise(totals)), totals
    assert scrape(files)["t_datums_total,pipeline=p"] == 1 + 40 * 3
