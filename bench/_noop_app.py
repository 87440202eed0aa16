"""The baseline of bench/throughput.py's `--latency 0` run: a Celery app built exactly as
promptq's (promptq.broker.celery_app: same broker, serializer, acks, prefetch, pool) with
one task that does nothing, run by Celery's own command line:

    python -m celery -A _noop_app worker -P gevent -Q bench-noop ...

What a worker spends per message of it is what Celery and the broker cost before promptq
does anything; the benchmark compares a job's CPU with it."""

from __future__ import annotations

from typing import Any

from celery import Celery

from promptq.broker.celery_app import create_celery
from promptq.config import Settings

NOOP_TASK = "bench.noop"
NOOP_QUEUE = "bench-noop"


def noop_app(settings: Settings | None = None) -> Celery:
    celery = create_celery(settings or Settings())
    # promptq's tasks are not this worker's business.
    celery.conf.include = []

    @celery.task(name=NOOP_TASK, ignore_result=True, acks_late=True)
    def noop(job_id: str, **_: Any) -> None:
        return None

    return celery


def __getattr__(name: str) -> Celery:
    # `celery -A _noop_app` looks for the module's `app`: built then, from the worker's
    # environment (the benchmark imports this module with none).
    if name == "app":
        return noop_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
