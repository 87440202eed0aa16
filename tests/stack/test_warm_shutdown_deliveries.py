"""A warm shutdown with a webhook POST in flight, in a real `promptq worker` process: the POST
ends and its attempt is recorded before the worker exits (worker.delivery_sending records
on threads of its own, which the delivery pool's shutdown waits for), so nothing is left
claimed to be sent a second time once its lease runs out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from helpers import SLOW_RECEIVER_SECONDS, Receiver, start_worker, stop_worker, unique
from sqlalchemy import select

from promptq.broker.celery_app import create_celery
from promptq.broker.publish import publish_jobs
from promptq.config import Settings
from promptq.db import session_scope
from promptq.jobs import service
from promptq.jobspec.schemas import JobCreate
from promptq.keys.service import authenticate
from promptq.models import WebhookAttempt, WebhookDelivery
from promptq.testing import SONNET


def test_a_warm_shutdown_records_the_webhook_posts_in_flight(
    quiet_env: dict[str, str], slow_receiver: Receiver, make_key: Any, tmp_path: Path
) -> None:
    settings = Settings(
        database_url=quiet_env["PROMPTQ_DATABASE_URL"], redis_url=quiet_env["PROMPTQ_REDIS_URL"]
    )
    with session_scope(settings) as session:
        key = authenticate(session, make_key("shutdown-webhook"))
        assert key is not None
        spec = {
            "model": SONNET,
            "max_tokens": 8,
            "prompt": unique("notify me"),
            "webhook_url": slow_receiver.url,
        }
        job_id = service.create_job(session, settings, key, JobCreate.model_validate(spec)).job.id
    publish_jobs(create_celery(settings), [job_id], "normal")
    worker = start_worker(quiet_env, tmp_path / "worker.log", concurrency=2)
    try:
        slow_receiver.wait_for(1)  # the POST is in flight: the receiver holds it
    finally:
        stop_worker(worker)  # SIGTERM
    assert worker.returncode == 0, worker.log_text()
    # The receiver answered after the signal, and the worker recorded it before exiting.
    assert time.monotonic() - slow_receiver.requests[0][2] >= SLOW_RECEIVER_SECONDS
    with session_scope(settings) as session:
        delivery = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
        ).one()
        attempts = session.scalars(
            select(WebhookAttempt.status_code).where(WebhookAttempt.delivery_id == delivery.id)
        ).all()
        assert (delivery.status, list(attempts)) == ("succeeded", [200])
