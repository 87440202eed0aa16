"""The Celery application: Redis broker, no result backend, built for I/O-bound tasks.

Built the same way by the worker (worker.app, which runs its tasks) and by the API (which
only sends them), so both agree on the queues, priorities and serialization; here, below
both, so that neither imports the other.

Pool: threads. Each task spends nearly all its time waiting on the upstream's HTTP answer,
and `requests` releases the GIL while it waits, so one process runs dozens of calls at once
on little CPU. Threads need no monkey-patching (gevent's patching of sockets does not reach
psycopg's C code, so PostgreSQL calls would block the whole hub) and share one connection
pool and one price table per process.
"""

from __future__ import annotations

from celery import Celery

from promptq.broker import task_names
from promptq.config import Settings
from promptq.redis_roles import RedisNotConfigured, celery_broker, role_url

# Redis inverts AMQP's convention: 0 is served first.
MESSAGE_PRIORITY = {"high": 0, "normal": 3, "low": 6}
QUEUE = "promptq"
# Webhook deliveries travel apart from jobs: a flood of them never stands in front of jobs
# in the broker. `promptq worker` consumes both queues by default.
WEBHOOK_QUEUE = "promptq-webhooks"


class BrokerNotConfigured(RedisNotConfigured):
    pass


PRUNE_INTERVAL_SECONDS = 3600.0


def broker_url(settings: Settings) -> str:
    """The broker's Redis (PROMPTQ_BROKER_URL, else PROMPTQ_REDIS_URL), without which
    neither the API nor a worker starts; a plain URL or a Sentinel group."""
    try:
        return role_url(settings, "broker")
    except RedisNotConfigured as exc:
        raise BrokerNotConfigured(str(exc)) from None


def create_celery(settings: Settings) -> Celery:
    broker_redis_url = broker_url(settings)
    # A Sentinel group becomes kombu's Sentinel transport, which asks the sentinels for the
    # primary and again after a failover. Celery's events and control messages travel over
    # this same connection: they are on the broker's Redis whatever the other roles say.
    broker, sentinel_options = celery_broker(broker_redis_url)
    app = Celery("promptq", broker=broker, include=["worker.tasks"])
    app.conf.update(
        # The broker's Redis as promptq names it: the publish markers and the backlog
        # (promptq.broker.publish) are read there with a plain client.
        promptq_broker_redis_url=broker_redis_url,
        # Said here rather than left to Celery's defaults: a broker message is only ever
        # JSON, so nothing that reaches Redis can make a worker unpickle it.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=QUEUE,
        task_acks_late=True,
        # A task whose process died is put back, not dropped: the job's claim makes a second
        # run of a finished job a no-op.
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        # Flower follows tasks from the worker's events. The "sent" event is left off: the
        # API would publish it on every POST, under a process-wide lock in Celery.
        worker_send_task_events=True,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout_seconds,
            "priority_steps": sorted(set(MESSAGE_PRIORITY.values())),
            "sep": ":",
            "queue_order_strategy": "priority",
            **sentinel_options,
        },
        beat_schedule={
            "sweep": {
                "task": task_names.SWEEP,
                "schedule": settings.sweep_interval_seconds,
                "options": {"expires": settings.sweep_interval_seconds},
            },
            # Retention: each run deletes for at most prune_budget_seconds, then the next
            # goes on. Does nothing with PROMPTQ_RETENTION_DAYS=0.
            "prune": {
                "task": task_names.PRUNE,
                "schedule": PRUNE_INTERVAL_SECONDS,
                "options": {"expires": PRUNE_INTERVAL_SECONDS},
            },
        },
        timezone="UTC",
    )
    return app
