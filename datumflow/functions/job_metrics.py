"""What the committer records in the metrics when a job ends, and as its figures progress.

A datum is counted here, once, when its job ends, from the job's tally: the committer that wrote
the job's end (the record's update admits one winner, however many committers run) counts every
datum of it by its final state, with its times, bytes and attempts. Counting where the results
are counted, rather than in the workers, keeps the figures whole when workers scale to zero, and
equal to the job's own (the first terminal result of each datum counts, as in the tally).
"""

from __future__ import annotations

from datumflow.broker.records import JobInfo, JobState
from datumflow.functions.tally import Tally
from datumflow.metrics import Metrics, current, observe_many

RESULT_STATES = ("success", "skipped", "failed", "recovered")
"""The states a datum result has; a datum without one when its job is killed counts as killed."""


def job_ended(*, pipeline: str, tally: Tally, state: JobState, record: JobInfo) -> None:
    """Count an ended job and its datums (killed: those without a result count as killed)."""
    metrics = current()
    if metrics is None:
        return
    counts = dict.fromkeys(RESULT_STATES, 0)
    download, process, upload = [], [], []
    attempts = 0
    for result in tally.results.values():
        counts[result.state] += 1
        if result.state == "skipped":
            continue
        attempts += result.attempts
        download.append(result.stats.download_time)
        process.append(result.stats.process_time)
        upload.append(result.stats.upload_time)
    for datum_state, count in counts.items():
        if count:
            metrics.datums.labels(pipeline=pipeline, state=datum_state).inc(count)
    if state == "killed" and tally.total is not None and tally.total > len(tally.results):
        metrics.datums.labels(pipeline=pipeline, state="killed").inc(
            tally.total - len(tally.results)
        )
    observe_many(metrics.download_seconds, pipeline, download)
    observe_many(metrics.process_seconds, pipeline, process)
    observe_many(metrics.upload_seconds, pipeline, upload)
    if tally.stats.download_bytes:
        metrics.download_bytes.labels(pipeline=pipeline).inc(tally.stats.download_bytes)
    if tally.stats.upload_bytes:
        metrics.upload_bytes.labels(pipeline=pipeline).inc(tally.stats.upload_bytes)
    if attempts:
        metrics.attempts.labels(pipeline=pipeline).inc(attempts)
    metrics.jobs.labels(pipeline=pipeline, state=state).inc()
    if record.finished and record.created:
        metrics.job_seconds.labels(pipeline=pipeline, state=state).observe(
            max(record.finished - record.created, 0.0)
        )
    running(metrics, pipeline=pipeline, tally=None)  # no job runs until the next is planned


def job_progress(*, pipeline: str, tally: Tally) -> None:
    """The running job's datums so far, by state (a pipeline runs one job at a time)."""
    metrics = current()
    if metrics is not None:
        running(metrics, pipeline=pipeline, tally=tally)


def running(metrics: Metrics, *, pipeline: str, tally: Tally | None) -> None:
    counts = tally.counts if tally is not None else dict.fromkeys(RESULT_STATES, 0)
    for state, count in counts.items():
        metrics.running_datums.labels(pipeline=pipeline, state=state).set(count)


def stood_down() -> None:
    """A committer that stops (its lease lost, or shut down) no longer shows the running jobs'
    figures nor the backlogs: the replica that took over does, and a sum over both pods (as the
    dashboard does) would count them twice, a max would keep a stale lag."""
    metrics = current()
    if metrics is None or metrics.shared:
        # Under `datumflow up` these gauges show the value written last by any process (the
        # active committer's), and prometheus-client cannot clear a series there.
        return
    for gauge in (
        metrics.running_datums,
        metrics.pending,
        metrics.ack_pending,
        metrics.redelivered,
    ):
        gauge.clear()
