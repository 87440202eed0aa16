"""Accounting for the ends recorded before the ledger and rollups existed: the jobs of the
previous release, and those its processes end while an upgrade rolls out.

An ended job's `accounted` flag says whether its end is in the spend ledger, the usage
rollup and its batch's counts (and an attempt's, whether it is in the attempt rollup). The
code that ends a job sets it in the transaction that writes those; this backfill takes the
ended jobs still at 0, a page at a time in id order through a partial index that holds only
them, and in one short transaction per page sets the flag (an UPDATE that only succeeds from
0, so nothing is counted twice, even by two backfills at once) and adds them in. It never
holds a lock on more than the page's rows, so writers go on meanwhile, and an interrupted
run resumes. `promptq db upgrade` runs it to the end; every sweeper pass runs it briefly, for
what processes of the previous release end until they are all restarted.

In promptq.jobs, beside the code that accounts for an end as it happens (end_effects,
execution): it writes the ledger (budgets), the rollups and the batch counts, so it sits
above all three.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from promptq.batches.repository import BatchRepository, outcome_of
from promptq.budgets.repository import BudgetRepository
from promptq.db import Database, session_scope
from promptq.models import ENDED_STATUSES, Attempt, Job, has_status, is_unaccounted_job
from promptq.periods import month_key
from promptq.rollups.service import EndedJob, RecordedAttempt, attempts_recorded, jobs_ended

PAGE = 1000


@dataclass
class BackfillReport:
    jobs: int = 0
    attempts: int = 0
    pages: int = 0
    seconds: float = 0.0
    complete: bool = True

    def describe(self) -> str:
        return (
            f"accounted for {self.jobs} ended jobs and {self.attempts} upstream calls in the "
            f"spend ledger and the hourly rollups ({self.pages} batches, {self.seconds:.1f} s)"
            + ("" if self.complete else "; stopped at its time budget, the next run goes on")
        )


def backfill(
    database: Database, *, page: int = PAGE, budget_seconds: float | None = None
) -> BackfillReport:
    report = BackfillReport()
    started = time.monotonic()
    after: str | None = None
    while True:
        with session_scope(database) as session:
            last, jobs, attempts = _page(session, after, page)
        if last is None:
            break
        report.pages += 1
        report.jobs += jobs
        report.attempts += attempts
        after = last
        if budget_seconds is not None and time.monotonic() - started >= budget_seconds:
            report.complete = False
            break
    report.seconds = time.monotonic() - started
    return report


def _page(session: Session, after: str | None, page: int) -> tuple[str | None, int, int]:
    """Account for one page of ended jobs; (the page's last id or None when there was none,
    jobs accounted, attempts accounted)."""
    query = select(Job.id).where(is_unaccounted_job())
    if after is not None:
        query = query.where(Job.id > after)
    # SKIP LOCKED (PostgreSQL): a page another backfill holds is left to it.
    query = query.order_by(Job.id).limit(page).with_for_update(skip_locked=True)
    ids = list(session.scalars(query))
    if not ids:
        return None, 0, 0
    claimed = session.execute(
        update(Job)
        .where(Job.id.in_(ids), Job.accounted == 0, has_status(*ENDED_STATUSES))
        .values(accounted=1)
        .returning(
            Job.id,
            Job.api_key_id,
            Job.model,
            Job.status,
            Job.finished_at,
            Job.updated_at,
            Job.input_tokens,
            Job.output_tokens,
            Job.cache_creation_input_tokens,
            Job.cache_read_input_tokens,
            Job.cost_total,
            Job.cost_input,
            Job.cost_output,
            Job.cost_cache_write,
            Job.cost_cache_read,
            Job.batch_id,
            Job.error_type,
        )
        .execution_options(synchronize_session=False)
    ).all()
    if not claimed:
        return ids[-1], 0, 0
    ended: list[EndedJob] = []
    spend: dict[tuple[str, str], tuple[Decimal, int]] = {}
    batches: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    owners: dict[str, tuple[str, str]] = {}
    for row in sorted(claimed, key=lambda r: r.id):
        # An ended job always has finished_at; updated_at is the best guess if one has not.
        finished = row.finished_at or row.updated_at
        if row.cost_total is not None:
            key = (row.api_key_id, month_key(finished))
            amount, count = spend.get(key, (Decimal(0), 0))
            spend[key] = (amount + row.cost_total, count + 1)
        ended.append(EndedJob.of_columns(row, finished))
        if row.batch_id is not None:
            batches[row.batch_id][outcome_of(row.status, row.error_type)] += 1
        owners[row.id] = (row.api_key_id, row.model)
    # The same order as the code that ends a job: batch rows, usage, attempts, ledger.
    for batch_id in sorted(batches):
        BatchRepository(session).count_ended(batch_id, batches[batch_id])
    jobs_ended(session, ended)
    attempts = session.execute(
        update(Attempt)
        .where(Attempt.job_id.in_(list(owners)), Attempt.accounted == 0)
        .values(accounted=1)
        .returning(
            Attempt.job_id,
            Attempt.finished_at,
            Attempt.outcome,
            Attempt.status_code,
            Attempt.latency_ms,
        )
        .execution_options(synchronize_session=False)
    ).all()
    attempts_recorded(
        session,
        [
            RecordedAttempt(
                *owners[a.job_id], a.finished_at, a.outcome, a.status_code, a.latency_ms
            )
            for a in attempts
        ],
    )
    ledger = BudgetRepository(session)
    for (api_key_id, month), (amount, count) in sorted(spend.items()):
        ledger.add_spend(api_key_id, month, amount, jobs=count)
    return ids[-1], len(claimed), len(attempts)
