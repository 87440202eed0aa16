"""Sending one webhook delivery: the Celery edge of promptq.webhooks.deliveries."""

from __future__ import annotations

from promptq.db import session_scope
from promptq.logging import log_context
from promptq.types import utcnow
from promptq.webhooks import deliveries
from worker.app import app
from worker.context import worker_context
from worker.publish import publish_delivery
from worker.tasks.base import RETRY_TRANSIENT, promptq_task


@promptq_task("deliver_webhook", **RETRY_TRANSIENT)
def deliver_webhook(delivery_id: str) -> str:
    with log_context(delivery_id=delivery_id, task="promptq.deliver_webhook"):
        return _deliver(delivery_id)


def _deliver(delivery_id: str) -> str:
    ctx = worker_context()
    with session_scope(ctx.settings.database_url) as session:
        prepared = deliveries.take(session, delivery_id)
    if prepared is None:
        return "nothing to do"
    started_at = utcnow()
    result = ctx.webhooks.post(prepared.url, prepared.body, prepared.headers)
    with session_scope(ctx.settings.database_url) as session:
        delay = deliveries.record(session, prepared, result, started_at)
    if delay is not None:
        publish_delivery(app, delivery_id, countdown=delay)
    return f"{result.status_code or result.error}; retry in {delay}s" if delay else "settled"
