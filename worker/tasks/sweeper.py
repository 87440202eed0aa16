"""The periodic safety net (run by `promptq beat`): jobs whose message was lost are
published again, and jobs whose worker died are taken back."""

from __future__ import annotations

import logging

from promptq.db import session_scope
from promptq.jobs.sweeping import reclaim_expired, stale_runnable_jobs
from worker.app import app
from worker.context import worker_context
from worker.publish import publish_job, unpublished
from worker.tasks.base import promptq_task

log = logging.getLogger(__name__)


@promptq_task("sweep")
def sweep() -> dict[str, int]:
    settings = worker_context().settings
    with session_scope(settings.database_url) as session:
        reclaimed = reclaim_expired(session)
    with session_scope(settings.database_url) as session:
        candidates = stale_runnable_jobs(session, settings)
    lost = set(unpublished(app, [job_id for job_id, _ in candidates]))
    for job_id, priority in reclaimed + [c for c in candidates if c[0] in lost]:
        publish_job(app, job_id, priority)
    if reclaimed or lost:
        log.info(
            "sweep: %d jobs taken back from dead workers, %d re-published",
            len(reclaimed),
            len(lost),
        )
    return {"reclaimed": len(reclaimed), "republished": len(lost)}
