"""Running one job: the Celery edge of promptq.jobs.runner."""

from __future__ import annotations

import contextlib
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject

from promptq.broker import task_names
from promptq.broker.publish import clear_published
from promptq.jobs.call_slots import ShuttingDown
from promptq.priority import Priority
from promptq.ratelimit.protocol import Grant
from worker.app import get_app
from worker.context import worker_context
from worker.tasks.base import promptq_task


class RunJobTask(Task):  # type: ignore[misc]
    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        # The message is gone; without its marker the sweeper publishes the job again soon
        # instead of waiting for the marker to expire.
        with contextlib.suppress(redis.RedisError):
            clear_published(get_app(), args[0])


@promptq_task(task_names.RUN_JOB, base=RunJobTask)
def run_job(job_id: str, grant: dict[str, Any] | None = None) -> str:
    """`grant` is set when a dispatcher already took rate-limit budget for this job."""
    try:
        return worker_context().runner.run(
            job_id, Grant.from_message(grant) if grant else None, rank=_broker_priority()
        )
    except ShuttingDown:
        # A standby job when the worker began to stop: untouched, its message goes back to
        # the broker's queue for another worker (or this one, started again).
        raise Reject("the worker is stopping", requeue=True) from None


def _broker_priority() -> int:
    """The message's priority on the broker (promptq.priority, lower first): a job waiting
    for a call slot goes before waiting jobs of lower priority."""
    priority = (run_job.request.delivery_info or {}).get("priority")
    return priority if isinstance(priority, int) else Priority.NORMAL.broker_priority
