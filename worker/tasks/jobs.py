"""Running one job: claim, call the upstream, record. The edges of the job lifecycle."""

from __future__ import annotations

import logging

from promptq.db import session_scope
from promptq.jobs.execution import claim_job, record_attempt
from worker.app import app
from worker.context import worker_context
from worker.publish import clear_published, publish_job
from worker.tasks.base import promptq_task

log = logging.getLogger(__name__)


@promptq_task("run_job")
def run_job(job_id: str) -> str:
    ctx = worker_context()
    url = ctx.settings.database_url
    with session_scope(url) as session:
        claim = claim_job(session, ctx.settings, job_id)
    if claim.job is None:
        if claim.due_in is not None:
            # Delivered early (a clock apart, or a duplicate): come back when it is due.
            publish_job(app, job_id, claim.priority or "normal", countdown=claim.due_in)
            return "not due"
        return "nothing to do"
    clear_published(app, job_id)
    job = claim.job
    with ctx.leases.holding(job_id):
        result = ctx.upstream.create_message(job.request)
    with session_scope(url) as session:
        verdict = record_attempt(session, ctx.settings, ctx.prices, job, result)
    log.info(
        "job %s attempt %d: %s (upstream %s, %d ms)",
        job_id,
        job.attempt,
        verdict.status,
        result.status_code,
        result.latency_ms,
    )
    if verdict.retry_in is not None:
        publish_job(app, job_id, job.priority, countdown=verdict.retry_in)
    return str(verdict.status)
