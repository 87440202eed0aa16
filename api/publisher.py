"""The API's side of the broker: publish committed jobs and webhook deliveries, never failing
the request for it (the row is committed; the sweeper publishes it once the broker is back)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from celery import Celery

from promptq.broker.celery_app import create_celery
from promptq.broker.publish import publish_batch, publish_delivery, publish_job
from promptq.config import Settings

log = logging.getLogger(__name__)

Publisher = Callable[[str, str], None]


@dataclass(frozen=True)
class BrokerPublisher:
    """One Celery app (and so one producer pool) per API process, for every kind of message."""

    app: Celery

    @classmethod
    def for_settings(cls, settings: Settings) -> BrokerPublisher:
        return cls(create_celery(settings))

    def job(self, job_id: str, priority: str) -> None:
        self._quietly(f"job {job_id}", lambda: publish_job(self.app, job_id, priority))

    def batch(self, batch_id: str) -> None:
        self._quietly(f"batch {batch_id}'s requests", lambda: publish_batch(self.app, batch_id))

    def delivery(self, delivery_id: str) -> None:
        self._quietly(f"delivery {delivery_id}", lambda: publish_delivery(self.app, delivery_id))

    @staticmethod
    def _quietly(what: str, publish: Callable[[], None]) -> None:
        try:
            publish()
        except Exception:
            log.warning("could not publish %s now; the sweeper will", what, exc_info=True)
