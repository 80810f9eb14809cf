"""The Celery side: one app on the bench's redis-server, one task per kind of work.

The delivery guarantee matches datumflow's: `acks_late` (a task is acked after it ran, so a worker
that dies has it redelivered) and a prefetch of 1 (a worker holds one task at a time). Results go
to the Redis backend, as datumflow's go to its results stream.
"""

from __future__ import annotations

import os

from celery import Celery

from bench import work

app = Celery(
    "bench",
    broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)


@app.task(name="bench.noop")
def noop(path: str) -> None:
    work.noop(path)


@app.task(name="bench.cpu")
def cpu(path: str) -> None:
    work.cpu(path)


@app.task(name="bench.sleep")
def sleep(path: str) -> None:
    work.nap(path)


TASKS = {"noop": noop, "cpu": cpu, "sleep": sleep}
