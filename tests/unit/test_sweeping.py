"""The sweeper's decisions (promptq.jobs.sweeping): which running jobs lost their worker and
what becomes of them, and which runnable jobs may have lost their message."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from promptq.budgets.repository import BudgetRepository
from promptq.config import Settings
from promptq.db import session_scope
from promptq.jobs.execution import claim_job, reserve_budget, runnable_job
from promptq.jobs.sweeping import reclaim_expired, stale_runnable_jobs
from promptq.models import Job, WebhookDelivery
from promptq.pricing import PriceTable
from promptq.testing import SONNET, SentMessages

MakeJob = Callable[..., str]
JobOf = Callable[[str], Job]
LONG_AGO = timedelta(hours=1)


def set_job(settings: Settings, job_id: str, **values: Any) -> None:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        for name, value in values.items():
            setattr(job, name, value)


def start(settings: Settings, job_id: str, prices: PriceTable | None = None) -> None:
    """Claimed by a worker (its budget reserved, as the runner does), which then died."""
    with session_scope(settings.database_url) as session:
        job = runnable_job(session, job_id)
        assert job is not None
        claimed = claim_job(session, settings, job)
        assert claimed is not None
        if prices is not None:
            assert reserve_budget(session, settings, prices, claimed) is None


def reclaim(settings: Settings) -> tuple[Any, SentMessages]:
    """What reclaim_expired returned, and what its transaction sent once committed."""
    sent = SentMessages()
    with session_scope(settings.database_url, sent) as session:
        reclaimed = reclaim_expired(session, settings)
    return reclaimed, sent


def test_a_running_job_whose_lease_ran_out_is_made_runnable_again(
    settings: Settings,
    prices: PriceTable,
    make_key: Callable[..., str],
    make_job: MakeJob,
    job_of: JobOf,
) -> None:
    key_id = make_key(monthly_budget_usd=Decimal(5))
    job_id = make_job(key_id=key_id, priority="high")
    start(settings, job_id, prices)
    set_job(settings, job_id, lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))

    reclaimed, sent = reclaim(settings)

    assert reclaimed.runnable == [job_id]
    assert sent.sent == [("publish_job", job_id, "high", None)]
    job = job_of(job_id)
    assert job.status == "retrying" and job.error_type == "worker_lost"
    assert job.lease_expires_at is None and job.finished_at is None
    assert job.error_message == (
        "the worker running attempt 1 stopped answering; the job will be tried again"
    )
    # The dead worker's budget reservation went with its claim.
    with session_scope(settings.database_url) as session:
        assert BudgetRepository(session).reservations(key_id) == []


def test_a_job_that_lost_its_worker_on_its_last_attempt_fails_and_says_so(
    settings: Settings, make_job: MakeJob, job_of: JobOf, database_url: str
) -> None:
    job_id = make_job(webhook_url="https://hooks.example.com/promptq")
    start(settings, job_id)
    set_job(
        settings,
        job_id,
        attempts=settings.max_attempts,
        lease_expires_at=datetime.now(UTC) - timedelta(seconds=1),
    )

    reclaimed, sent = reclaim(settings)

    assert reclaimed.runnable == []
    job = job_of(job_id)
    assert job.status == "failed" and job.finished_at is not None
    assert job.error_message is not None and "no attempts left" in job.error_message
    with session_scope(database_url) as session:
        [delivery] = session.query(WebhookDelivery).filter_by(job_id=job_id).all()
        assert delivery.event_type == "job.failed"
    # Its end set off as any job's end does, once the sweeper's transaction committed.
    assert sent.sent == [("announce_finished", job_id), ("deliver_webhook", delivery.id)]


def test_a_running_job_whose_lease_holds_is_left_alone(
    settings: Settings, make_job: MakeJob, job_of: JobOf
) -> None:
    job_id = make_job()
    start(settings, job_id)

    assert reclaim(settings)[0].runnable == []
    assert job_of(job_id).status == "running"


def test_stale_and_due_jobs_are_candidates_for_publishing_again(
    settings: Settings, make_job: MakeJob
) -> None:
    now = datetime.now(UTC)
    make_job()  # just made: its message is surely still on its way
    untouched = make_job()
    set_job(settings, untouched, updated_at=now - LONG_AGO)
    parked_due = make_job()  # waited for its key's rpm, and that time has come
    set_job(settings, parked_due, next_attempt_at=now - timedelta(seconds=1))
    parked_later = make_job()  # a long backoff, not over yet, though untouched for an hour
    set_job(
        settings,
        parked_later,
        status="retrying",
        next_attempt_at=now + LONG_AGO,
        updated_at=now - LONG_AGO,
    )
    running = make_job()
    start(settings, running)
    set_job(settings, running, updated_at=now - LONG_AGO)

    with session_scope(settings.database_url) as session:
        candidates = stale_runnable_jobs(session, settings)

    assert {c.id for c in candidates} == {untouched, parked_due}
    assert [c.id for c in candidates] == sorted(c.id for c in candidates)
    assert {(c.model, c.priority) for c in candidates} == {(SONNET, "normal")}
