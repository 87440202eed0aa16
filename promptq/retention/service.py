"""Pruning: finished jobs older than the retention period leave the database in small
batches by id range, each batch a short transaction of its own, so no lock is held for
long, a prune beside busy workers slows nobody, and an interrupted one simply resumes (what
it deleted is gone, what it did not is found again).

What is kept: jobs in flight, always; finished jobs for `retention_days` after they ended;
a Message Batch's requests for as long as the batch is kept (`retention_days` after it
ended), so its results stay readable; money and figures forever, in the spend ledger and
the hourly rollups, which retention never touches. Idempotency keys hold for 24 hours, less
than the shortest retention (a day). Retention 0 keeps everything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from ulid import ULID

from promptq.clock import utcnow
from promptq.config import Settings
from promptq.db import session_scope
from promptq.retention.repository import RetentionRepository

PAGE = 500


@dataclass
class PruneReport:
    cutoff: datetime | None
    dry_run: bool
    jobs: int = 0
    attempts: int = 0
    deliveries: int = 0
    batches: int = 0
    seconds: float = 0.0
    # False when the time budget ran out first: the next run goes on.
    complete: bool = True

    @property
    def rows(self) -> int:
        return self.jobs + self.attempts + self.deliveries + self.batches

    def describe(self) -> str:
        if self.cutoff is None:
            return "retention is off (PROMPTQ_RETENTION_DAYS=0): nothing is deleted"
        verb = "would delete" if self.dry_run else "deleted"
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{verb} {self.jobs} jobs that ended before {self.cutoff.isoformat()}, "
            f"{self.attempts} attempts, {self.deliveries} webhook deliveries and "
            f"{self.batches} message batches, in {self.seconds:.1f} s ({rate:,.0f} rows/s)"
            + ("" if self.complete else "; stopped at its time budget, the next run goes on")
        )


def cutoff_for(settings: Settings, now: datetime | None = None) -> datetime | None:
    if settings.retention_days == 0:
        return None
    return (now or utcnow()) - timedelta(days=settings.retention_days)


def _below(prefix: str, cutoff: datetime) -> str:
    """The smallest id of this type made at `cutoff`: every id made before it sorts lower."""
    return f"{prefix}_{str(ULID.from_datetime(cutoff))[:10]}{'0' * 16}"


def eligible_jobs(settings: Settings, now: datetime | None = None) -> int:
    """How many stored jobs outside batches the policy deletes now (batch requests go with
    their batches)."""
    cutoff = cutoff_for(settings, now)
    if cutoff is None:
        return 0
    with session_scope(settings) as session:
        return RetentionRepository(session).count_old_jobs(cutoff, _below("job", cutoff))


def prune(
    settings: Settings,
    *,
    dry_run: bool = False,
    budget_seconds: float | None = None,
    page: int = PAGE,
    now: datetime | None = None,
) -> PruneReport:
    """Delete (or, dry, count) what the retention policy lets go, page by page, until done
    or `budget_seconds` ran out."""
    cutoff = cutoff_for(settings, now)
    report = PruneReport(cutoff, dry_run)
    if cutoff is None:
        return report
    started = time.monotonic()

    def out_of_time() -> bool:
        return budget_seconds is not None and time.monotonic() - started >= budget_seconds

    def jobs_of(batch_id: str | None) -> bool:
        """Every old job outside batches (None) or of one batch; False if time ran out."""
        after: str | None = None
        while True:
            with session_scope(settings) as session:
                repository = RetentionRepository(session)
                ids = repository.old_job_ids(cutoff, below, after, page, batch_id)
                if not ids:
                    return True
                if dry_run:
                    attempts, deliveries = repository.children(ids)
                    report.jobs += len(ids)
                else:
                    jobs, attempts, deliveries = repository.delete_jobs(ids, cutoff)
                    report.jobs += jobs
                report.attempts += attempts
                report.deliveries += deliveries
            after = ids[-1]
            if out_of_time():
                return False

    below = _below("job", cutoff)
    finished = jobs_of(None)
    # Batches that ended before the cutoff: their requests, then the batch.
    after_batch: str | None = None
    while finished:
        with session_scope(settings) as session:
            batch_ids = RetentionRepository(session).old_batch_ids(
                cutoff, _below("msgbatch", cutoff), after_batch, page
            )
        if not batch_ids:
            break
        for batch_id in batch_ids:
            if not jobs_of(batch_id):
                finished = False
                break
            with session_scope(settings) as session:
                if dry_run:
                    report.batches += 1
                else:
                    report.batches += RetentionRepository(session).delete_batch_if_empty(batch_id)
        after_batch = batch_ids[-1]
    # Deliveries of no job (batch.ended events).
    after_delivery: str | None = None
    while finished:
        with session_scope(settings) as session:
            repository = RetentionRepository(session)
            delivery_ids = repository.old_event_delivery_ids(
                cutoff, _below("dlv", cutoff), after_delivery, page
            )
            if not delivery_ids:
                break
            if dry_run:
                report.deliveries += len(delivery_ids)
            else:
                report.deliveries += repository.delete_deliveries(delivery_ids)
        after_delivery = delivery_ids[-1]
        if out_of_time():
            finished = False
    report.complete = finished
    report.seconds = time.monotonic() - started
    return report
