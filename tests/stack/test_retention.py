"""Retention: finished jobs past PROMPTQ_RETENTION_DAYS leave with their attempts,
deliveries and reservations, in small batches that an interrupted prune resumes; jobs in
flight, a kept batch's requests, the ledger and the rollups stay. Real databases, and the
real `promptq db` commands."""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from helpers import clean_env, run_promptq
from sqlalchemy import func, select
from ulid import ULID

from promptq import budgets, retention, rollups
from promptq.clock import utcnow
from promptq.db import session_scope
from promptq.jobs.backfill import backfill
from promptq.keys.service import create_key
from promptq.models import (
    Attempt,
    BatchStatus,
    Job,
    JobStatus,
    MessageBatch,
    SpendLedger,
    UsageHourly,
    WebhookAttempt,
    WebhookDelivery,
)
from promptq.rollups.reading import rollup_rows
from promptq.testing import SONNET


def made_at(prefix: str, moment: datetime) -> str:
    """An id as one made at `moment` (ids are ULIDs: they carry their time)."""
    return f"{prefix}_{ULID.from_datetime(moment)}"


def add(
    url: str,
    key: str,
    created: datetime,
    status: str,
    finished: datetime | None,
    batch_id: str | None = None,
    accounted: bool = True,
) -> str:
    """A job as the workers leave it: an attempt, a webhook delivery with its attempt, and,
    when it ended, its cost in the rollups and the ledger."""
    job_id = made_at("job", created)
    ended = finished is not None and JobStatus(status).is_final
    # Not accounted: ended by the previous release, not yet in the ledger and rollups.
    counted = ended and accounted
    with session_scope(url) as session:
        job = Job(
            id=job_id,
            api_key_id=key,
            status=status,
            model=SONNET,
            request={},
            attempts=1,
            max_attempts=4,
            created_at=created,
            updated_at=finished or created,
            finished_at=finished,
            input_tokens=10,
            output_tokens=20,
            cost_total=Decimal("0.000330") if ended else None,
            cost_input=Decimal("0.000030") if ended else None,
            cost_output=Decimal("0.000300") if ended else None,
            batch_id=batch_id,
            accounted=1 if counted else 0,
        )
        session.add(job)
        session.flush()
        session.add(
            Attempt(
                job_id=job_id,
                number=1,
                started_at=created,
                finished_at=finished or created,
                latency_ms=900,
                outcome="succeeded",
                status_code=200,
            )
        )
        delivery = made_at("dlv", finished or created)
        session.add(
            WebhookDelivery(
                id=delivery,
                event_id=made_at("msg", created),
                job_id=job_id,
                api_key_id=key,
                url="https://example.com/hook",
                event_type="job.succeeded",
                body="{}",
                status="succeeded" if ended else "pending",
                attempts=1,
                created_at=created,
                finished_at=finished,
            )
        )
        session.flush()
        session.add(
            WebhookAttempt(
                delivery_id=delivery, number=1, started_at=created, latency_ms=5, status_code=200
            )
        )
        if counted and finished is not None:
            rollups.job_ended(session, job)
            budgets.record_spend(session, key, finished, Decimal("0.000330"))
    return job_id


def batch(url: str, key: str, ended: datetime) -> str:
    batch_id = made_at("msgbatch", ended - timedelta(hours=1))
    with session_scope(url) as session:
        session.add(
            MessageBatch(
                id=batch_id,
                api_key_id=key,
                processing_status=BatchStatus.ENDED,
                request_count=2,
                created_at=ended - timedelta(hours=1),
                expires_at=ended + timedelta(hours=23),
                ended_at=ended,
                succeeded_count=2,
            )
        )
    return batch_id


def counts(url: str) -> dict[str, int]:
    with session_scope(url) as session:
        return {
            table.__tablename__: int(session.scalar(select(func.count()).select_from(table)) or 0)
            for table in (Job, Attempt, WebhookDelivery, WebhookAttempt, MessageBatch)
        }


def money(url: str) -> tuple[Any, ...]:
    with session_scope(url) as session:
        ledger = sorted((r.month, r.spent, r.jobs) for r in session.scalars(select(SpendLedger)))
        usage = sorted(
            (r.hour, r.status, r.jobs, r.cost_total)
            for r in session.execute(select(rollup_rows(UsageHourly)))
        )
    return tuple(ledger), tuple(usage)


def test_prune_deletes_only_what_the_policy_lets_go_and_resumes(
    fresh_database_url: str, settings: Any
) -> None:
    url = fresh_database_url
    own = settings.model_copy(update={"database_url": url, "retention_days": 30})
    now = utcnow()
    old, recent = now - timedelta(days=40), now - timedelta(days=5)
    with session_scope(url) as session:
        key = create_key(session, "retention").record.id
    gone = [add(url, key, old - timedelta(minutes=i), "succeeded", old) for i in range(7)]
    gone.append(add(url, key, old, "failed", old + timedelta(hours=1)))
    # In flight however old: never touched.
    queued = add(url, key, old, "queued", None)
    running = add(url, key, old, "running", None)
    kept = [add(url, key, old, "succeeded", recent), add(url, key, recent, "canceled", recent)]
    # A batch that ended long ago goes with its requests; one that ended recently is kept
    # with its requests, however long ago they finished.
    old_batch = batch(url, key, old + timedelta(hours=2))
    gone += [add(url, key, old, "succeeded", old, batch_id=old_batch) for _ in range(2)]
    kept_batch = batch(url, key, recent)
    kept += [add(url, key, old, "succeeded", old, batch_id=kept_batch) for _ in range(2)]
    # Ended by the previous release and not yet backfilled: kept until its money is counted.
    unaccounted = add(url, key, old, "succeeded", old, accounted=False)
    kept.append(unaccounted)
    before, figures = counts(url), money(url)
    assert retention.eligible_jobs(own) == 8  # outside batches

    dry = retention.prune(own, dry_run=True)
    assert (dry.jobs, dry.attempts, dry.deliveries, dry.batches) == (10, 10, 10, 1)
    assert dry.complete and counts(url) == before

    # No time at all, three jobs a page: the first run stops after a page; the next go on.
    first = retention.prune(own, budget_seconds=0, page=3)
    assert not first.complete and first.jobs == 3
    runs = [first]
    while not runs[-1].complete:
        runs.append(retention.prune(own, budget_seconds=0, page=3))
        assert len(runs) < 20
    assert sum(r.jobs for r in runs) == 10 and sum(r.batches for r in runs) == 1
    assert sum(r.attempts for r in runs) == 10 and sum(r.deliveries for r in runs) == 10

    after = counts(url)
    assert after["jobs"] == before["jobs"] - 10
    assert after["attempts"] == before["attempts"] - 10
    assert after["webhook_deliveries"] == before["webhook_deliveries"] - 10
    assert after["webhook_attempts"] == before["webhook_attempts"] - 10
    assert after["message_batches"] == before["message_batches"] - 1
    with session_scope(url) as session:
        left = set(session.scalars(select(Job.id)))
        assert session.get(MessageBatch, kept_batch) is not None
        assert session.get(MessageBatch, old_batch) is None
    assert left == {queued, running, *kept}
    assert not left & set(gone)
    # Money and figures stay, to the picodollar.
    assert money(url) == figures
    # Nothing left to delete, until the backfill has counted the last one's money.
    assert retention.prune(own).jobs == 0
    assert backfill(url).jobs == 1
    assert money(url) != figures
    assert retention.prune(own).jobs == 1
    with session_scope(url) as session:
        assert session.get(Job, unaccounted) is None


def promptq_db(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_promptq("db", *args, env=clean_env(PROMPTQ_DATABASE_URL=url, **env), timeout=120)


def test_upgrade_says_what_retention_will_delete_and_prune_dry_run_deletes_nothing(
    fresh_database_url: str,
) -> None:
    url = fresh_database_url
    old = utcnow() - timedelta(days=40)
    with session_scope(url) as session:
        key = create_key(session, "upgrade").record.id
    for i in range(3):
        add(url, key, old - timedelta(minutes=i), "succeeded", old)
    add(url, key, utcnow(), "succeeded", utcnow())

    upgraded = promptq_db(url, "upgrade").stdout
    assert "3 stored jobs ended before that and will be deleted" in upgraded
    assert "PROMPTQ_RETENTION_DAYS=0" in upgraded
    kept = promptq_db(url, "upgrade", PROMPTQ_RETENTION_DAYS="0").stdout
    assert "every job is kept" in kept

    dry = promptq_db(url, "prune", "--dry-run").stdout
    assert dry.startswith("would delete 3 jobs") and "rows/s" in dry
    assert counts(url)["jobs"] == 4
    assert "retention is off" in promptq_db(url, "prune", PROMPTQ_RETENTION_DAYS="0").stdout
    assert counts(url)["jobs"] == 4
    done = promptq_db(url, "prune").stdout
    assert done.startswith("deleted 3 jobs")
    assert counts(url)["jobs"] == 1
