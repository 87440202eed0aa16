"""The worker's Celery application (`celery -A worker.app`), built from the settings by
promptq.broker.celery_app, as the API builds its own to send tasks."""

from __future__ import annotations

from typing import Any

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


app = create_celery(get_settings())
