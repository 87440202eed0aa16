"""The one decorator every promptq task goes through."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from worker.app import app


def promptq_task(name: str, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """A task with a stable name (`promptq.<name>`, what Flower shows and publishers send),
    no stored result, and acknowledgement only after it ran."""

    def decorate(func: Callable[..., Any]) -> Any:
        return app.task(name=f"promptq.{name}", ignore_result=True, acks_late=True, **options)(func)

    return decorate
