"""Subject, stream, consumer and bucket names: the one place they are spelled."""

from __future__ import annotations

COMMITS_STREAM = "DF_COMMITS"
DATUMS_STREAM = "DF_DATUMS"
RESULTS_STREAM = "DF_RESULTS"
DEAD_STREAM = "DF_DEAD"
ADVISORIES_STREAM = "DF_ADVISORIES"

REPOS_BUCKET = "df_repos"
BRANCHES_BUCKET = "df_branches"
COMMITS_BUCKET = "df_commits"
PIPELINES_BUCKET = "df_pipelines"
JOBS_BUCKET = "df_jobs"
JOB_HEADS_BUCKET = "df_job_heads"

COMMITTER_CONSUMER = "df-committer"
ADVISORY_CONSUMER = "df-max-deliveries"
INGEST_CONSUMER = "df-ingest"
COMMITS_CONSUMER = "df-commits"


def commit(repo: str) -> str:
    return f"df.commit.{repo}"


def datum(pipeline: str) -> str:
    return f"df.datum.{pipeline}"


def result(pipeline: str, job: str) -> str:
    return f"df.result.{pipeline}.{job}"


def results(pipeline: str, job: str) -> str:
    """Where several results of a job travel in one message (messages.DatumResults)."""
    return f"df.result.{pipeline}.{job}.set"


def job_planned(pipeline: str, job: str) -> str:
    return f"df.job.{pipeline}.{job}"


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
