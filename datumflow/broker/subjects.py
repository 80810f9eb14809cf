"""Subject, stream, consumer and bucket names: the one place they are spelled."""

from __future__ import annotations

COMMITS_STREAM = "DF_COMMITS"
DATUMS_STREAM = "DF_DATUMS"
RESULTS_STREAM = "DF_RESULTS"
DEAD_STREAM = "DF_DEAD"
ADVISORIES_STREAM = "DF_ADVISORIES"
INGEST_STREAM = "DF_INGEST"

REPOS_BUCKET = "df_repos"
BRANCHES_BUCKET = "df_branches"
COMMITS_BUCKET = "df_commits"
PIPELINES_BUCKET = "df_pipelines"
JOBS_BUCKET = "df_jobs"
JOB_HEADS_BUCKET = "df_job_heads"
LEASES_BUCKET = "df_leases"
"""One key per function that runs active/standby (committer, ingest): who is active now."""
MAPPINGS_BUCKET = "df_bucket_mappings"
"""Buckets feeding repos (datumflow.pfs.bucket_sources)."""

COMMITTER_CONSUMER = "df-committer"
ADVISORY_CONSUMER = "df-max-deliveries"
INGEST_CONSUMER = "df-ingest"
COMMITS_CONSUMER = "df-commits"


INGEST_DEFAULT = "df.ingest.>"
"""Publish bucket notifications here (`df.ingest.<anything>`) when no mapping names a subject."""
COMMITS_ALL = "df.commit.>"
RERUNS_ALL = "df.rerun.>"
DATUMS_ALL = "df.datum.>"
RESULTS_ALL = "df.result.>"
JOBS_ALL = "df.job.>"
DEAD_ALL = "df.dead.>"


JS_API = "$JS.API"
"""Where the JetStream API listens (the requests nats-py does not make for us)."""


def kv_stream(bucket: str) -> str:
    """The stream under a KV bucket."""
    return f"KV_{bucket}"


def kv_keys(bucket: str, prefix: str = "") -> str:
    """The subjects of a KV bucket's keys under `prefix`, as a wildcard."""
    return f"{kv_key_prefix(bucket)}{prefix}>"


def kv_key_prefix(bucket: str) -> str:
    """What a KV bucket's subjects start with, before the key."""
    return f"$KV.{bucket}."


def reserved(subject: str) -> bool:
    """Whether `subject` is one of datumflow's own (under `df.`), and not one bucket notifications
    may be published on (`df.ingest.<name>...`)."""
    tokens = subject.split(".")
    return tokens[0] == "df" and (len(tokens) < 3 or tokens[1] != "ingest")


def commit(repo: str) -> str:
    return f"df.commit.{repo}"


def rerun(pipeline: str) -> str:
    """Requests to rerun a job's failed datums (messages.RerunRequest), in the commit stream."""
    return f"df.rerun.{pipeline}"


def is_rerun(subject: str) -> bool:
    return subject.startswith("df.rerun.")


def datum(pipeline: str) -> str:
    return f"df.datum.{pipeline}"


def result(pipeline: str, job: str) -> str:
    return f"df.result.{pipeline}.{job}"


def results(pipeline: str, job: str) -> str:
    """Where several results of a job travel in one message (messages.DatumResults)."""
    return f"df.result.{pipeline}.{job}.set"


def job_planned(pipeline: str, job: str) -> str:
    return f"df.job.{pipeline}.{job}"


def is_job_planned(subject: str) -> bool:
    """Whether a message of the results stream is a job's "planned" event."""
    return subject.startswith("df.job.")


def is_results(subject: str) -> bool:
    """Whether a message of the results stream holds several results (`results`)."""
    return subject.startswith("df.result.") and subject.endswith(".set")


def logs(pipeline: str, job: str = "*", datum: str = "*") -> str:
    """Live output of user code (core NATS, not stored: the stored log is in the datum result)."""
    return f"df.logs.{pipeline}.{job}.{datum}"


def dead(function: str) -> str:
    return f"df.dead.{function}"


def worker_consumer(pipeline: str) -> str:
    """The durable pull consumer a pipeline's workers share; KEDA reads its lag."""
    return f"df-worker-{pipeline}"


def planner_consumer(pipeline: str) -> str:
    """One consumer per pipeline on the commit stream, one event at a time: jobs run in order."""
    return f"df-planner-{pipeline}"


def max_deliveries_advisory(stream: str = DATUMS_STREAM, consumer: str = "*") -> str:
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}"
