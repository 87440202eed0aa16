"""The one decorator every promptq task goes through."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from promptq.db import TRANSIENT_DATABASE_ERRORS
from worker.app import app

# Worth waiting out rather than dropping the message: the database or Redis restarting.
TRANSIENT_ERRORS = (*TRANSIENT_DATABASE_ERRORS, redis.ConnectionError, redis.TimeoutError)
RETRY_TRANSIENT = {
    "autoretry_for": TRANSIENT_ERRORS,
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": 20,
}


def promptq_task(name: str, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """A task with a stable name (`promptq.<name>`, what Flower shows and publishers send),
    no stored result, and acknowledgement only after it ran."""

    def decorate(func: Callable[..., Any]) -> Any:
        return app.task(name=f"promptq.{name}", ignore_result=True, acks_late=True, **options)(func)

    return decorate
