"""The worker's Celery application (`celery -A worker.app`), built from the settings by
promptq.broker.celery_app, as the API builds its own to send tasks.

Built when first asked for (get_app), not at import: the tasks are declared without it
(worker.tasks.base), so that importing them, to test or to list them, needs no broker
settings."""

from __future__ import annotations

from functools import cache
from typing import Any

from celery import Celery
from celery.signals import setup_logging

from promptq.broker.celery_app import create_celery
from promptq.config import get_settings
from promptq.logging import configure_logging


@setup_logging.connect
def _configure_logging(**_: Any) -> None:
    """With a receiver on this signal Celery configures no logging of its own (no handlers,
    no coloured task format, no stdout redirection), whether started by `promptq worker`,
    `promptq beat` or `celery -A worker.app`: every record goes to promptq's JSON lines."""
    configure_logging(get_settings())


@cache
def get_app() -> Celery:
    return create_celery(get_settings())


def __getattr__(name: str) -> Celery:
    # `celery -A worker.app` looks for the module's `app`: built then.
    if name == "app":
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
