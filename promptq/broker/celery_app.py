"""The Celery application: Redis broker, no result backend, built for I/O-bound tasks.

Built the same way by the worker (worker.app, which runs its tasks) and by the API (which
only sends them), so both agree on the queues, priorities and serialization; here, below
both, so that neither imports the other.

Pool: gevent. A job spends nearly all its life waiting on the upstream's answer (5 to 60
seconds for an LLM), so what one process can keep waiting at once decides how many
processes, machines and database connections a deployment needs. Each task runs in a
greenlet: a thousand waiting calls cost a thousand small stacks and sockets, and no CPU
until their answers come. psycopg (3.1.14 and later), redis-py and requests cooperate once
the process is patched, which `promptq worker` does before anything else is imported
(promptq.cli.green); the database pool, the price table and the limiter stay one per
process. Threads were measured against it on the same code (docs/benchmarks.md, "Throughput"): at
concurrency 1,000 and a 10 s upstream, a thread pool never got past about 750 calls in
flight, its threads fighting over the GIL, where the greenlets held all 1,000.

Task events are off unless somebody watches: Flower turns them on when it starts (it sends
`enable_events` to the workers every few seconds), and each event is a publish on the
broker for every task, three a job.
"""

from __future__ import annotations

from celery import Celery

from promptq.broker import task_names, transport
from promptq.config import Settings
from promptq.priority import BROKER_PRIORITY_STEPS
from promptq.redis_roles import RedisNotConfigured, celery_broker, role_url

QUEUE = "promptq"
# Webhook deliveries travel apart from jobs: a flood of them never stands in front of jobs
# in the broker. `promptq worker` consumes both queues by default.
WEBHOOK_QUEUE = "promptq-webhooks"


class BrokerNotConfigured(RedisNotConfigured):
    pass


PRUNE_INTERVAL_SECONDS = 3600.0
# Broker connections beyond one per greenlet: the consumer's own, and the dispatcher's and
# delivery loop's publishes.
BROKER_SPARE_CONNECTIONS = 16
# The broker's connections give up on a Redis that stopped answering without closing them
# (a network partition, a host gone, a NAT or firewall entry forgotten). kombu's Redis
# transport waits forever by default, unlike redis-py's own clients (5 s): a publish, an
# acknowledgement or a worker's warm shutdown (which reads the reply of its last BRPOP)
# hangs for the kernel's TCP retries, minutes, and after a partition of a few minutes TCP's
# backoff waits up to 2 more minutes before trying again, however soon the network is
# back. No broker command blocks for long by design (BRPOP waits 1 s on the server), so a
# reply 10 s late means a dead connection: kombu drops it and connects afresh.
BROKER_SOCKET_TIMEOUT_SECONDS = 10.0
BROKER_SOCKET_CONNECT_TIMEOUT_SECONDS = 5.0


def broker_url(settings: Settings) -> str:
    """The broker's Redis (PROMPTQ_BROKER_URL, else PROMPTQ_REDIS_URL), without which
    neither the API nor a worker starts; a plain URL or a Sentinel group."""
    try:
        return role_url(settings, "broker")
    except RedisNotConfigured as exc:
        raise BrokerNotConfigured(str(exc)) from None


def create_celery(settings: Settings) -> Celery:
    broker_redis_url = broker_url(settings)
    # Before any connection: one redis-py client per pool, not one per command.
    transport.install()
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
        # Twice the greenlets may be unacknowledged: with every greenlet busy, the
        # consumer holds the next message while it waits for one to end (gevent's pool
        # blocks it there), so it never reaches the limit. At the limit Celery's green loop
        # stops asking Redis and sleeps out its 2 s poll before it asks again, however soon
        # a task ends: a worker at full concurrency would run in bursts, 2 s apart.
        worker_prefetch_multiplier=2,
        # The pool is chosen on the command line, never here: `promptq worker` passes
        # `--pool=gevent`, and `celery -A worker.app worker` must be given `-P gevent`, so
        # that the process is patched before it imports anything (Celery refuses to patch
        # from this setting, which it reads too late).
        # Greenlets: the calls in flight, and the standby jobs waiting for one to end
        # (promptq.jobs.call_slots).
        worker_concurrency=settings.worker_greenlets,
        # Flower follows tasks from the worker's events, and turns them on itself (above).
        # The "sent" event stays off: the API would publish it on every POST.
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout_seconds,
            # The broker's connection pool in each process (kombu's default is 10): in a
            # worker every greenlet acknowledges its own message when its task ends, and a
            # burst of ends past the pool's size failed ("Couldn't ack ... Too many
            # connections"), the consumer's bookkeeping of a message it had just taken
            # with them, so that message was lost until the sweeper published its job
            # again. redis-py opens connections only as many are in use at once.
            "max_connections": settings.worker_greenlets + BROKER_SPARE_CONNECTIONS,
            "priority_steps": BROKER_PRIORITY_STEPS,
            "sep": ":",
            "queue_order_strategy": "priority",
            "socket_timeout": BROKER_SOCKET_TIMEOUT_SECONDS,
            "socket_connect_timeout": BROKER_SOCKET_CONNECT_TIMEOUT_SECONDS,
            # An idle connection whose peer is gone is found out too (the kernel's probes).
            "socket_keepalive": True,
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
