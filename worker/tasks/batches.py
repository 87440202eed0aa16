"""Feeding a Message Batch's requests to the queue: the Celery edge of promptq.batches."""

from __future__ import annotations

from promptq.batches.service import job_ids_to_publish
from promptq.broker import task_names
from promptq.broker.publish import publish_jobs
from promptq.db import session_scope
from promptq.models import Priority
from worker.app import get_app
from worker.context import worker_context
from worker.tasks.base import promptq_task

FEED_PAGE = 500


@promptq_task(task_names.FEED_BATCH)
def feed_batch(batch_id: str) -> int:
    """Publish every runnable request of the batch, a page at a time. Running twice only
    publishes duplicates, which their claim makes harmless; dying halfway loses nothing,
    since the sweeper publishes runnable jobs left without a message."""
    ctx = worker_context()
    after: str | None = None
    published = 0
    while True:
        with session_scope(ctx.settings) as session:
            job_ids = job_ids_to_publish(session, batch_id, after, FEED_PAGE)
        if not job_ids:
            return published
        publish_jobs(get_app(), job_ids, Priority.LOW)
        published += len(job_ids)
        after = job_ids[-1]
