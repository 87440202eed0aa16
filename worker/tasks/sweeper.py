"""The periodic safety net (run by `promptq beat`): jobs whose message was lost are
published again, and jobs whose worker died are taken back. Each pass walks the stale jobs
for at most sweep_budget_seconds, from where the last pass stopped."""

from __future__ import annotations

import logging
from datetime import timedelta

from promptq import retention
from promptq.batches.service import expire_and_close
from promptq.db import session_scope
from promptq.jobs.sweeping import reclaim_expired, republish_stale
from promptq.rollups.backfill import backfill
from promptq.types import utcnow
from promptq.webhooks import deliveries
from worker import task_names
from worker.app import app
from worker.context import worker_context
from worker.publish import CeleryBroker, publish_delivery, publish_job
from worker.tasks.base import promptq_task

log = logging.getLogger(__name__)


# Where the next pass over stale jobs starts: shared by every worker that runs a sweep. Only
# a hint: lost (a wiped Redis), the next pass starts from the first job.
CURSOR_KEY = "promptq:sweep:cursor"


# Periodic: a pass that fails is retried by the next one, from where the last one stopped.
@promptq_task(task_names.SWEEP, retry_transient=False)
def sweep() -> dict[str, int]:
    ctx = worker_context()
    url = ctx.settings.database_url
    with session_scope(url) as session:
        reclaimed = reclaim_expired(session, ctx.settings)
    # Ends recorded by processes of the previous release while an upgrade rolls out (an
    # empty partial index once they are gone: nothing to read).
    backfill(url, budget_seconds=1.0)
    client = ctx.limiter.client
    start = client.get(CURSOR_KEY)
    stale = republish_stale(
        ctx.settings,
        CeleryBroker(app),
        ctx.limiter,
        start.decode() if isinstance(start, bytes) else start,
        budget_seconds=ctx.settings.sweep_budget_seconds,
    )
    if stale.cursor is None:
        client.delete(CURSOR_KEY)
    else:
        client.set(CURSOR_KEY, stale.cursor)
    for job_id, priority in reclaimed.runnable:
        publish_job(app, job_id, priority)
    # Batches: requests past the 24 hours expire, and a batch whose last request ended
    # without ending it (a job canceled on its own, say) is ended here.
    with session_scope(url) as session:
        batch_deliveries = expire_and_close(session, ctx.settings)
    # Deliveries due for a few seconds: their message was lost, their sender died, or their
    # wait was too long for a broker countdown. A duplicate sends nothing (take() is a CAS).
    with session_scope(url) as session:
        due = deliveries.due(session, utcnow() - timedelta(seconds=2))
    for delivery_id in [*reclaimed.deliveries, *batch_deliveries, *due]:
        publish_delivery(app, delivery_id)
    if reclaimed.runnable or stale.republished or due:
        log.info(
            "sweep: %d jobs taken back from dead workers, %d re-published, %d deliveries sent",
            len(reclaimed.runnable),
            len(stale.republished),
            len(due),
        )
    return {
        "reclaimed": len(reclaimed.runnable),
        "republished": len(stale.republished),
        "deliveries": len(due),
    }


@promptq_task(task_names.PRUNE, retry_transient=False)
def prune() -> dict[str, int]:
    """Retention (promptq.retention): finished jobs past PROMPTQ_RETENTION_DAYS leave, for at
    most prune_budget_seconds per run."""
    ctx = worker_context()
    report = retention.prune(ctx.settings, budget_seconds=ctx.settings.prune_budget_seconds)
    if report.rows:
        log.info("prune: %s", report.describe())
    return {"jobs": report.jobs, "attempts": report.attempts, "deliveries": report.deliveries}
