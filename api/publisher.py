"""The API's side of the broker: publish committed jobs and webhook deliveries, never failing
the request for it (the row is committed; the sweeper publishes it once the broker is back)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from celery import Celery

from promptq.config import Settings

log = logging.getLogger(__name__)

Publisher = Callable[[str, str], None]


@dataclass(frozen=True)
class BrokerPublisher:
    """One Celery app (and so one producer pool) per API process, for every kind of message."""

    app: Celery

    @classmethod
    def for_settings(cls, settings: Settings) -> BrokerPublisher:
        from worker.app import create_celery

        return cls(create_celery(settings))

    def job(self, job_id: str, priority: str) -> None:
        from worker.publish import publish_job

        try:
            publish_job(self.app, job_id, priority)
        except Exception:
            log.warning("could not publish job %s now; the sweeper will", job_id, exc_info=True)

    def batch(self, batch_id: str) -> None:
        from worker.publish import publish_batch

        try:
            publish_batch(self.app, batch_id)
        except Exception:
            log.warning(
                "could not publish batch %s now; the sweeper will publish its requests",
                batch_id,
                exc_info=True,
            )

    def delivery(self, delivery_id: str) -> None:
        from worker.publish import publish_delivery

        try:
            publish_delivery(self.app, delivery_id)
        except Exception:
            log.warning(
                "could not publish delivery %s now; the sweeper will", delivery_id, exc_info=True
            )
