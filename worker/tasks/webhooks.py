"""The Celery task that sent webhook deliveries before they had a Redis list of their own
(worker.deliveries): processes of an earlier release may still publish it while an upgrade
rolls out. It only moves the id over to the delivery loops."""

from __future__ import annotations

from promptq.broker import task_names
from promptq.broker.publish import publish_delivery
from worker.app import get_app
from worker.tasks.base import promptq_task


@promptq_task(task_names.DELIVER_WEBHOOK)
def deliver_webhook(delivery_id: str) -> str:
    publish_delivery(get_app(), delivery_id)
    return "handed to the delivery loops"
