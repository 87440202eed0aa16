"""The API's side of the broker: publish committed jobs, never failing the request for it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from promptq.config import Settings

log = logging.getLogger(__name__)

Publisher = Callable[[str, str], None]


def celery_publisher(settings: Settings) -> Publisher:
    from worker.app import create_celery
    from worker.publish import publish_job

    app = create_celery(settings)

    def publish(job_id: str, priority: str) -> None:
        try:
            publish_job(app, job_id, priority)
        except Exception:
            # The row is committed and queued; the sweeper publishes it once the broker is
            # back, so the client still gets its 202.
            log.warning("could not publish job %s now; the sweeper will", job_id, exc_info=True)

    return publish


def celery_deliverer(settings: Settings) -> Callable[[str], None]:
    from worker.app import create_celery
    from worker.publish import publish_delivery

    app = create_celery(settings)

    def deliver(delivery_id: str) -> None:
        try:
            publish_delivery(app, delivery_id)
        except Exception:
            log.warning(
                "could not publish delivery %s now; the sweeper will", delivery_id, exc_info=True
            )

    return deliver
