"""Sending one webhook delivery: the Celery edge of promptq.webhooks.deliveries.

The task claims the delivery and hands the sending to the worker's delivery pool (its own
threads, a few per key), so a slow receiver never holds a Celery thread.
"""

from __future__ import annotations

from promptq.broker import task_names
from promptq.broker.publish import publish_delivery
from promptq.clock import utcnow
from promptq.db import session_scope
from promptq.logging import log_context
from promptq.webhooks import deliveries
from promptq.webhooks.deliveries import PreparedDelivery
from worker.app import get_app
from worker.context import worker_context
from worker.tasks.base import promptq_task

# How long a delivery that found no room waits before the sweeper publishes it again.
NO_ROOM_POSTPONE_SECONDS = 2.0


@promptq_task(task_names.DELIVER_WEBHOOK)
def deliver_webhook(delivery_id: str) -> str:
    ctx = worker_context()
    with session_scope(ctx.settings) as session:
        key_id = deliveries.key_of(session, delivery_id)
        if key_id is None:
            return "nothing to do"
        if not ctx.deliveries.try_reserve(key_id):
            # Behind the other due deliveries, so that a key with thousands of them waiting
            # cannot keep others' out of the sweeper's passes; it publishes this one again.
            deliveries.postpone(session, delivery_id, NO_ROOM_POSTPONE_SECONDS)
            return "no room: postponed"
        try:
            prepared = deliveries.take(session, delivery_id)
        except BaseException:
            ctx.deliveries.release(key_id)
            raise
    if prepared is None:
        ctx.deliveries.release(key_id)
        return "nothing to do"
    ctx.deliveries.submit(key_id, lambda: _send(prepared))
    return "sending"


def _send(prepared: PreparedDelivery) -> None:
    ctx = worker_context()
    # On a thread of the delivery pool, outside the task's own log context.
    with log_context(delivery_id=prepared.id, task=task_names.DELIVER_WEBHOOK):
        started_at = utcnow()
        result = ctx.webhooks.post(prepared.url, prepared.body, prepared.headers)
        with session_scope(ctx.settings) as session:
            delay = deliveries.record(session, prepared, result, started_at)
        if delay is not None:
            publish_delivery(get_app(), prepared.id, countdown=delay)
