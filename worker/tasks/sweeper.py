"""The periodic safety net (run by `promptq beat`): jobs whose message was lost are
published again, and jobs whose worker died are taken back (and the hourly rollups' hours
that are over folded). Each pass walks the stale jobs for at most sweep_budget_seconds,
from where the last pass stopped."""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from celery import Celery
from redis.exceptions import LockError
from redis.lock import Lock

from promptq import retention
from promptq.batches.service import expire_and_close
from promptq.broker import task_names
from promptq.broker.publish import broker_backlog, publish_deliveries, publish_jobs, unpublished
from promptq.clock import utcnow
from promptq.config import Settings
from promptq.db import session_scope
from promptq.jobs.backfill import backfill
from promptq.jobs.sweeping import Candidate, reclaim_expired, republish_stale
from promptq.redis_keys import SWEEP_CURSOR, SWEEP_LOCK
from promptq.rollups.folding import fold_closed_hours
from promptq.webhooks import deliveries
from worker.app import get_app
from worker.context import WorkerContext, worker_context
from worker.tasks.base import promptq_task

log = logging.getLogger(__name__)


# Messages published at once by a pass, and how many in each producer's slice.
PUBLISHERS = 4
# Walks one sweep task makes in a row while they keep finding lost jobs, each within
# sweep_budget_seconds; then the task hands over to a message of its own.
DRAIN_WALKS = 6
PUBLISH_SLICE = 250


# Periodic: a pass that fails is retried by the next one, from where the last one stopped.
@promptq_task(task_names.SWEEP, retry_transient=False)
def sweep() -> dict[str, int]:
    ctx = worker_context()
    # One pass at a time: a pass that ran out of its budget sends the next one at once, and
    # beat's tick may come meanwhile; two passes from one cursor would publish twice.
    lock = ctx.limiter.client.lock(SWEEP_LOCK, timeout=_lock_seconds(ctx.settings))
    if not lock.acquire(blocking=False):
        return {"reclaimed": 0, "republished": 0, "deliveries": 0, "hours_folded": 0}
    try:
        with ThreadPoolExecutor(PUBLISHERS, thread_name_prefix="sweep-publish") as publishers:
            figures, drain_on = _sweep_pass(ctx, publishers, lock)
    finally:
        with contextlib.suppress(LockError):  # expired: a later pass owns it now
            lock.release()
    if drain_on:
        # Sent once the lock is let go: sent before, it could be taken at once by another
        # thread, find the lock held and do nothing, and the drain would wait for the tick.
        sweep.apply_async(expires=ctx.settings.sweep_interval_seconds)
    return figures


def _sweep_pass(
    ctx: WorkerContext, publishers: ThreadPoolExecutor, lock: Lock
) -> tuple[dict[str, int], bool]:
    """The pass's figures, and whether lost jobs are still ahead for the next task."""
    # The jobs taken back are published again, and the ends of those that failed for good
    # set off, once this commits.
    with session_scope(ctx.settings, ctx.messenger) as session:
        reclaimed = reclaim_expired(session, ctx.settings)
    # Ends recorded by processes of the previous release while an upgrade rolls out (an
    # empty partial index once they are gone: nothing to read).
    backfill(ctx.settings, budget_seconds=1.0)
    # The shards of the hours over (nothing to do most passes: an index probe a table).
    folded = fold_closed_hours(ctx.settings)
    client = ctx.limiter.client
    start = client.get(SWEEP_CURSOR)
    broker = CeleryBroker(get_app(), publishers)
    republished = 0
    drain_on = False
    for walk in range(DRAIN_WALKS):
        stale = republish_stale(
            ctx.settings,
            broker,
            ctx.limiter,
            start.decode() if isinstance(start, bytes) else start,
            budget_seconds=ctx.settings.sweep_budget_seconds,
        )
        republished += len(stale.republished)
        if stale.cursor is None:
            client.delete(SWEEP_CURSOR)
            break
        client.set(SWEEP_CURSOR, stale.cursor)
        if not stale.drain_now:
            break
        # Lost jobs still ahead (a wiped Redis): the next walk goes on at once, in this task
        # while it may (its lock renewed), then in a message of its own, rather than at
        # beat's next tick or behind worker threads busy with long calls.
        if walk + 1 == DRAIN_WALKS:
            drain_on = True
        else:
            lock.extend(_lock_seconds(ctx.settings), replace_ttl=True)
            start = stale.cursor
    # Batches: requests past the 24 hours expire, and a batch whose last request ended
    # without ending it (a job canceled on its own, say) is ended here.
    with session_scope(ctx.settings, ctx.messenger) as session:
        expire_and_close(session, ctx.settings)
    # Deliveries due for a few seconds: their message was lost, their sender died, or their
    # retry was too far off to wait in its worker. A duplicate sends nothing (take() is a CAS).
    with session_scope(ctx.settings) as session:
        due = deliveries.due(session, utcnow() - timedelta(seconds=2))
    publish_deliveries(get_app(), due)
    if reclaimed.runnable or republished or due:
        log.info(
            "sweep: %d jobs taken back from dead workers, %d re-published, %d deliveries sent",
            len(reclaimed.runnable),
            republished,
            len(due),
        )
    figures = {
        "reclaimed": len(reclaimed.runnable),
        "republished": republished,
        "deliveries": len(due),
        "hours_folded": folded,
    }
    return figures, drain_on


class CeleryBroker:
    """The sweeper's view of the broker (promptq.jobs.sweeping.Broker): the Celery app's
    Redis lists and the publish markers beside them."""

    def __init__(self, app: Celery, publishers: ThreadPoolExecutor) -> None:
        self.app = app
        self.publishers = publishers

    def has_backlog(self) -> bool:
        return broker_backlog(self.app) > 0

    def unpublished(self, job_ids: Sequence[str]) -> list[str]:
        return unpublished(self.app, list(job_ids))

    def publish_jobs(self, jobs: Sequence[Candidate]) -> None:
        # After a wiped Redis every queued job is lost at once, and each message is a round
        # trip to Redis: a page goes out in slices through several producer connections at
        # once, each slice's markers in one pipeline.
        futures = [
            self.publishers.submit(publish_jobs, self.app, ids, priority)
            for priority, ids in _slices(jobs)
        ]
        for future in futures:
            future.result()


def _slices(candidates: Sequence[Candidate]) -> list[tuple[str, list[str]]]:
    """(priority, ids) groups of at most PUBLISH_SLICE ids each."""
    by_priority: dict[str, list[str]] = defaultdict(list)
    for candidate in candidates:
        by_priority[candidate.priority].append(candidate.id)
    return [
        (priority, ids[start : start + PUBLISH_SLICE])
        for priority, ids in by_priority.items()
        for start in range(0, len(ids), PUBLISH_SLICE)
    ]


def _lock_seconds(settings: Settings) -> int:
    """Longer than a pass can take (its walk's budget plus the short steps around it), so
    the lock outlives a pass only when its worker died, and then not for long."""
    return int(settings.sweep_budget_seconds * 2 + 30)


@promptq_task(task_names.PRUNE, retry_transient=False)
def prune() -> dict[str, int]:
    """Retention (promptq.retention): finished jobs past PROMPTQ_RETENTION_DAYS leave, for at
    most prune_budget_seconds per run."""
    ctx = worker_context()
    report = retention.prune(ctx.settings, budget_seconds=ctx.settings.prune_budget_seconds)
    if report.rows:
        log.info("prune: %s", report.describe())
    return {"jobs": report.jobs, "attempts": report.attempts, "deliveries": report.deliveries}
