"""The periodic safety net (run by `promptq beat`): jobs whose message was lost are
published again, and jobs whose worker died are taken back. Each pass walks the stale jobs
for at most sweep_budget_seconds, from where the last pass stopped."""

from __future__ import annotations

import logging
from datetime import timedelta

from promptq import retention
from promptq.batches.service import expire_and_close
from promptq.broker.publish import broker_backlog, publish_delivery, publish_job, unpublished
from promptq.clock import utcnow
from promptq.db import session_scope
from promptq.jobs.backfill import backfill
from promptq.jobs.sweeping import Candidate, reclaim_expired, walk_stale
from promptq.webhooks import deliveries
from worker.app import app
from worker.context import worker_context
from worker.tasks.base import promptq_task

log = logging.getLogger(__name__)


# Where the next pass over stale jobs starts: shared by every worker that runs a sweep. Only
# a hint: lost (a wiped Redis), the next pass starts from the first job.
CURSOR_KEY = "promptq:sweep:cursor"


@promptq_task("sweep")
def sweep() -> dict[str, int]:
    ctx = worker_context()
    url = ctx.settings.database_url
    with session_scope(url) as session:
        reclaimed = reclaim_expired(session, ctx.settings)
    # Ends recorded by processes of the previous release while an upgrade rolls out (an
    # empty partial index once they are gone: nothing to read).
    backfill(url, budget_seconds=1.0)
    # A job is accounted for while it waits in its model's rate-limit queue, or while its
    # message's marker lives and the broker still holds messages it may be among. With the
    # broker's queue empty, a due job nobody claimed lost its message whatever its marker
    # says (a worker killed between taking a message and recording it); publishing it again
    # is safe, since a job runs only for the delivery that claims it.
    backlog = broker_backlog(app) > 0
    lost: list[Candidate] = []

    def republish(candidates: list[Candidate]) -> None:
        if backlog:
            without_marker = set(unpublished(app, [c.id for c in candidates]))
        else:
            without_marker = {c.id for c in candidates}
        queued = ctx.limiter.queued([(c.id, c.model) for c in candidates if c.id in without_marker])
        for candidate in candidates:
            if candidate.id in without_marker and candidate.id not in queued:
                publish_job(app, candidate.id, candidate.priority)
                lost.append(candidate)

    client = ctx.limiter.client
    start = client.get(CURSOR_KEY)
    cursor = walk_stale(
        ctx.settings,
        start.decode() if isinstance(start, bytes) else start,
        republish,
        budget_seconds=ctx.settings.sweep_budget_seconds,
    )
    if cursor is None:
        client.delete(CURSOR_KEY)
    else:
        client.set(CURSOR_KEY, cursor)
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
    if reclaimed.runnable or lost or due:
        log.info(
            "sweep: %d jobs taken back from dead workers, %d re-published, %d deliveries sent",
            len(reclaimed.runnable),
            len(lost),
            len(due),
        )
    return {"reclaimed": len(reclaimed.runnable), "republished": len(lost), "deliveries": len(due)}


@promptq_task("prune")
def prune() -> dict[str, int]:
    """Retention (promptq.retention): finished jobs past PROMPTQ_RETENTION_DAYS leave, for at
    most prune_budget_seconds per run."""
    ctx = worker_context()
    report = retention.prune(ctx.settings, budget_seconds=ctx.settings.prune_budget_seconds)
    if report.rows:
        log.info("prune: %s", report.describe())
    return {"jobs": report.jobs, "attempts": report.attempts, "deliveries": report.deliveries}
