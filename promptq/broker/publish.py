"""Putting job ids on the broker. Called only after the job's row has committed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery

from promptq.broker import task_names
from promptq.broker.celery_app import QUEUE
from promptq.priority import Priority
from promptq.ratelimit.protocol import Grant
from promptq.redis_keys import DELIVERY_QUEUE, published_marker
from promptq.redis_roles import redis_client

log = logging.getLogger(__name__)

# Never wait in the broker longer than this: a longer wait is the job's next_attempt_at,
# and the sweeper publishes it when it is due (the Redis broker redelivers unacknowledged
# delayed messages after its visibility timeout, again and again).
MAX_COUNTDOWN_SECONDS = 60.0
# While this marker lives, the sweeper assumes the job's message is still in the broker.
# It dies with a wiped Redis, so lost messages are re-published.
PUBLISHED_MARKER_TTL_SECONDS = 600
# Messages (and their markers) sent in one Redis pipeline by publish_each.
PUBLISH_CHUNK = 500


def publish_delivery(app: Celery, delivery_id: str) -> None:
    """Put a webhook delivery's id where the workers' delivery loops take it at once."""
    publish_deliveries(app, [delivery_id])


def publish_deliveries(app: Celery, delivery_ids: Sequence[str]) -> None:
    """Deliveries travel apart from jobs, and not through Celery: on a Redis list of their
    own (the broker's Redis), popped by a loop in each worker process that only pops when
    one of its delivery threads is free (worker.deliveries). A Celery message would wait
    for a free job thread and be fetched only after every job queue turned up empty."""
    if delivery_ids:
        _marker_client(app).lpush(DELIVERY_QUEUE, *delivery_ids)


def take_delivery(app: Celery, timeout: float) -> str | None:
    """The next delivery id published, waiting for one up to `timeout` seconds."""
    popped = _marker_client(app).brpop([DELIVERY_QUEUE], timeout=timeout)
    if popped is None:
        return None
    value = popped[1]
    return value.decode() if isinstance(value, bytes) else str(value)


def publish_job(
    app: Celery,
    job_id: str,
    priority: str = Priority.NORMAL,
    countdown: float | None = None,
    grant: Grant | None = None,
) -> None:
    """Publish a job's id; with `grant`, the rate-limit budget a dispatcher took for it."""
    if countdown is not None and countdown > MAX_COUNTDOWN_SECONDS:
        clear_published(app, job_id)
        return  # left to the sweeper, which publishes it once due
    args = [job_id, grant.to_message()] if grant else [job_id]
    with app.producer_or_acquire() as producer, producer.batch() as batch:
        app.send_task(
            task_names.RUN_JOB,
            args=args,
            priority=Priority.named(priority).broker_priority,
            countdown=countdown if countdown and countdown > 0 else None,
            producer=producer,
            **_shown_as(args),
        )
        _mark_with(app, batch, [job_id])


def publish_jobs(app: Celery, job_ids: list[str], priority: str) -> None:
    """Publish many jobs of one priority to run now: publish_each."""
    publish_each(app, [(job_id, priority) for job_id in job_ids])


def publish_each(app: Celery, jobs: Sequence[tuple[str, str]]) -> None:
    """Publish (job id, priority) pairs to run now through one producer connection, a round
    trip per chunk of them with their markers."""
    with app.producer_or_acquire() as producer:
        for start in range(0, len(jobs), PUBLISH_CHUNK):
            chunk = jobs[start : start + PUBLISH_CHUNK]
            # Sized so that kombu never flushes on its own: the markers go after the last
            # message, in the flush on leaving the block.
            with producer.batch(max_size=len(chunk) + 1) as batch:
                for job_id, priority in chunk:
                    app.send_task(
                        task_names.RUN_JOB,
                        args=[job_id],
                        priority=Priority.named(priority).broker_priority,
                        producer=producer,
                        **_shown_as([job_id]),
                    )
                _mark_with(app, batch, [job_id for job_id, _ in chunk])


def _shown_as(args: list[Any]) -> dict[str, str]:
    """The message's argsrepr and kwargsrepr (what Flower shows), given rather than left to
    Celery, which builds them with reprlib-style truncation (`saferepr`, 1.5% of the API's
    CPU at intake in py-spy; too little for the intake bench to tell apart). A job id and a
    grant's few fields need no truncating, so they read the same."""
    return {"argsrepr": repr(args), "kwargsrepr": "{}"}


def _mark_with(app: Celery, batch: Any, job_ids: list[str]) -> None:
    """Mark the jobs published in the pipeline that carries their messages (kombu's Redis
    publish batch), after them: message and marker reach Redis in one round trip, which is
    most of what publishing costs at intake. Where the transport batches nothing (it sent
    the messages already), the markers go on their own."""
    pipeline = getattr(getattr(batch.state, "session", None), "pipeline", None)
    if pipeline is None:
        mark_published(app, job_ids)
        return
    for job_id in job_ids:
        pipeline.set(published_marker(job_id), 1, ex=PUBLISHED_MARKER_TTL_SECONDS)


def publish_batch(app: Celery, batch_id: str) -> None:
    """One message for a whole batch: a worker publishes its requests' jobs (off the API's
    request path, so creating 10,000 requests answers in a second or two)."""
    app.send_task(task_names.FEED_BATCH, args=[batch_id], priority=Priority.HIGH.broker_priority)


def mark_published(app: Celery, job_ids: list[str]) -> None:
    client = _marker_client(app)
    with client.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.set(published_marker(job_id), 1, ex=PUBLISHED_MARKER_TTL_SECONDS)
        pipe.execute()


def clear_published(app: Celery, job_id: str) -> None:
    _marker_client(app).delete(published_marker(job_id))


def unpublished(app: Celery, job_ids: list[str]) -> list[str]:
    if not job_ids:
        return []
    client = _marker_client(app)
    with client.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.exists(published_marker(job_id))
        present = pipe.execute()
    return [job_id for job_id, exists in zip(job_ids, present, strict=True) if not exists]


_clients: dict[str, redis.Redis] = {}


def _marker_client(app: Celery) -> redis.Redis:
    """The broker's Redis: the markers say what the broker holds, so they live and die
    with its data (promptq.redis_roles)."""
    url = app.conf.promptq_broker_redis_url
    if url not in _clients:
        _clients[url] = redis_client(url)
    return _clients[url]


def broker_backlog(app: Celery) -> int:
    """Messages waiting in the job queue (every priority level), not yet taken by a worker."""
    client = _marker_client(app)
    steps = app.conf.broker_transport_options["priority_steps"]
    sep = app.conf.broker_transport_options["sep"]
    names = [QUEUE] + [f"{QUEUE}{sep}{step}" for step in steps if step]
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(name)
        return sum(pipe.execute())
