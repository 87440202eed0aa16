"""The one decorator every promptq task goes through."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import redis
from celery import shared_task

from promptq.db import TRANSIENT_DATABASE_ERRORS
from promptq.logging import log_context

# Worth waiting out rather than dropping the message: the database or Redis restarting.
TRANSIENT_ERRORS = (*TRANSIENT_DATABASE_ERRORS, redis.ConnectionError, redis.TimeoutError)
RETRY_TRANSIENT = {
    "autoretry_for": TRANSIENT_ERRORS,
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": 20,
}
# The arguments that say what a task works on: every record it logs names them.
LOGGED_IDS = ("job_id", "delivery_id", "batch_id")


def promptq_task(
    name: str, *, retry_transient: bool = True, **options: Any
) -> Callable[[Callable[..., Any]], Any]:
    """A task registered under `name`, one of promptq.broker.task_names (what publishers send and
    Flower shows), with no stored result and acknowledged only after it ran. Whatever it
    logs names the task and the job, delivery or batch it was given. A database or Redis
    outage is waited out by retrying the task (RETRY_TRANSIENT); `retry_transient=False`
    for a periodic task, whose next run is its retry."""

    def decorate(func: Callable[..., Any]) -> Any:
        retry = RETRY_TRANSIENT if retry_transient else {}
        # Shared: registered on the worker's app when it is built (and on any other app
        # of the process), so that declaring a task builds no app.
        return shared_task(name=name, ignore_result=True, acks_late=True, **retry, **options)(
            logged(name, func)
        )

    return decorate


def logged(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func`, run in a log context with `task=name` and the ids of LOGGED_IDS it is given."""
    signature = inspect.signature(func)
    ids = [parameter for parameter in LOGGED_IDS if parameter in signature.parameters]

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        given = signature.bind_partial(*args, **kwargs).arguments if ids else {}
        fields = {parameter: given[parameter] for parameter in ids if parameter in given}
        with log_context(task=name, **fields):
            return func(*args, **kwargs)

    # Celery reads a task's arguments from its function (without following __wrapped__), to
    # check a call's arguments before it is sent: it sees the task's own this way.
    run.__signature__ = signature  # type: ignore[attr-defined]
    return run
