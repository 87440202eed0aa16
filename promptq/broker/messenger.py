"""The broker's side of promptq.outbox: what sends the messages a committed unit of work
recorded. Jobs, batches and webhook deliveries go on the broker through Celery; a job's end
is announced over Redis pub/sub (promptq.jobs.announcements).

Each process builds one when it starts (the API app in api/app.py, the worker in
worker/context.py) and hands it to the sessions it opens; see promptq.outbox for why it
travels with the session rather than sitting in a global."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis
from celery import Celery

from promptq.broker.publish import publish_batch, publish_delivery, publish_each, publish_job
from promptq.jobs.announcements import announce


@dataclass(frozen=True)
class BrokerMessenger:
    """promptq.outbox.Messenger over one Celery app (and so one producer pool) and the
    Redis that carries events (promptq.redis_roles: "events"), where announcements go."""

    app: Celery
    events: redis.Redis

    def publish_job(self, job_id: str, priority: str, countdown: float | None = None) -> None:
        publish_job(self.app, job_id, priority, countdown=countdown)

    def publish_jobs(self, jobs: Sequence[tuple[str, str]]) -> None:
        publish_each(self.app, jobs)

    def deliver_webhook(self, delivery_id: str) -> None:
        publish_delivery(self.app, delivery_id)

    def announce_finished(self, job_id: str) -> None:
        announce(self.events, job_id)

    def feed_batch(self, batch_id: str) -> None:
        publish_batch(self.app, batch_id)
