"""The worker side of a job: decide whether it may run, claim it, then record what one
upstream call gave.

The upstream call itself happens between the two, outside any database transaction, so a
slow upstream never holds a connection or a lock. What an attempt or an end sets off (the
retry's message, the word to waiters, the webhook deliveries) is recorded on the session and
sent once it commits (promptq.outbox).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from promptq import budgets, outbox, rollups
from promptq.batches.service import count_ended
from promptq.clock import utcnow
from promptq.config import Settings
from promptq.jobs.end_effects import end_events
from promptq.jobs.repository import JobRepository
from promptq.models import RUNNABLE_STATUSES, Attempt, Job, JobStatus
from promptq.pricing import PriceTable, cost_of
from promptq.upstream import Outcome, UpstreamResult
from promptq.usage import Usage


@dataclass(frozen=True)
class RunnableJob:
    """What deciding whether, and when, a queued job may run needs to know."""

    id: str
    model: str
    request: dict[str, Any]
    priority: str
    attempts: int
    api_key_id: str
    key_rpm: int | None
    waiting_for: str | None
    # Seconds until it is due (0: now).
    due_in: float
    # The key's monthly budget: only a key with one reserves money when its jobs start.
    key_monthly_budget_usd: Decimal | None = None
    anthropic_beta: str | None = None
    # The key was revoked: the job must not start (revocation cancels it; this catches a
    # job that slipped past, such as one submitted in the moment of the revocation).
    key_revoked: bool = False
    # The key's own cap on its jobs waiting at high priority (None: the server's).
    key_high_priority_waiting: int | None = None


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    api_key_id: str
    model: str
    request: dict[str, Any]
    priority: str
    attempt: int
    claimed_at: datetime
    anthropic_beta: str | None = None


@dataclass(frozen=True)
class AttemptVerdict:
    status: JobStatus
    # Seconds until the next attempt, when the job is to be retried (its message, with this
    # countdown, goes once the attempt commits).
    retry_in: float | None = None


def runnable_job(session: Session, job_id: str) -> RunnableJob | None:
    """The job if it is waiting to run; None when it is gone, running or finished."""
    found = JobRepository(session).with_key(job_id)
    if found is None:
        return None
    job, key = found
    if job.status not in RUNNABLE_STATUSES:
        return None
    now = utcnow()
    due_in = (job.next_attempt_at - now).total_seconds() if job.next_attempt_at else 0.0
    return RunnableJob(
        id=job.id,
        model=job.model,
        request=job.request,
        priority=job.priority,
        attempts=job.attempts,
        api_key_id=job.api_key_id,
        key_rpm=key.rpm,
        waiting_for=job.waiting_for,
        due_in=max(0.0, due_in),
        key_monthly_budget_usd=key.monthly_budget_usd,
        anthropic_beta=job.anthropic_beta,
        key_revoked=key.revoked_at is not None,
        key_high_priority_waiting=(key.quotas or {}).get("high_priority_waiting"),
    )


KEY_REVOKED_ERROR = "key_revoked"


def revoked_key_values(now: datetime) -> dict[str, Any]:
    """A job canceled because its key was revoked before it started."""
    return {
        "status": JobStatus.CANCELED,
        "finished_at": now,
        "updated_at": now,
        "next_attempt_at": None,
        "error_type": KEY_REVOKED_ERROR,
        "error_message": "the API key that submitted this job was revoked before it ran",
    }


def cancel_for_revoked_key(session: Session, job_id: str) -> bool:
    """Cancel a job of a revoked key that slipped past the revocation, counted as every
    job's end is (its hour's rollup, its batch's counts)."""
    values = {**revoked_key_values(utcnow()), "accounted": 1}
    if not JobRepository(session).transition(job_id, RUNNABLE_STATUSES, values):
        return False
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    rollups.job_ended(session, job)
    if job.batch_id is not None:
        count_ended(session, job.batch_id, "canceled")
    outbox.announce_finished(session, job.id)
    return True


def claim_job(session: Session, settings: Settings, job: RunnableJob) -> ClaimedJob | None:
    """Take the job for one attempt; None when another delivery took it first."""
    now = utcnow()
    lease_until = now + timedelta(seconds=settings.claim_lease_seconds)
    if not JobRepository(session).claim(job.id, now, lease_until):
        return None
    return ClaimedJob(
        id=job.id,
        api_key_id=job.api_key_id,
        model=job.model,
        request=job.request,
        priority=job.priority,
        attempt=job.attempts + 1,
        claimed_at=now,
        anthropic_beta=job.anthropic_beta,
    )


@dataclass(frozen=True)
class Refusal:
    """A claimed job that was failed instead of started: its budget could not hold it."""

    message: str


def reserve_budget(
    session: Session,
    settings: Settings,
    prices: PriceTable,
    claimed: ClaimedJob,
    now: datetime | None = None,
) -> Refusal | None:
    """Reserve the claimed job's maximum cost against its key's budget, in the claim's own
    transaction; None when it fits (or the key has no budget). When it does not fit, the
    job fails here with `budget_exceeded_error` and never reaches the upstream."""
    message = budgets.reserve(
        session, prices, claimed.api_key_id, claimed.id, claimed.model, claimed.request, now
    )
    if message is None:
        return None
    _fail_over_budget(session, settings, claimed, message)
    return Refusal(message)


def _fail_over_budget(
    session: Session, settings: Settings, claimed: ClaimedJob, message: str
) -> None:
    now = utcnow()
    repository = JobRepository(session)
    failed = repository.transition(
        claimed.id,
        [JobStatus.RUNNING],
        {
            "status": JobStatus.FAILED,
            "finished_at": now,
            # Counted by end_events, in this transaction.
            "accounted": 1,
            "updated_at": now,
            "lease_expires_at": None,
            "error_type": budgets.BUDGET_EXCEEDED,
            "error_message": message,
            "upstream_status": None,
            # The claim counted an attempt, but the upstream was never asked.
            "attempts": Job.attempts - 1,
        },
    )
    if not failed:
        return
    job = repository.get(claimed.id)
    assert job is not None
    end_events(session, settings, job)


def mark_waiting(session: Session, job_id: str, reason: str, until: datetime | None = None) -> None:
    """Say what a runnable job waits for (a rate limit, its key's rpm); `until` also moves
    the time it is due."""
    values: dict[str, Any] = {"waiting_for": reason, "updated_at": utcnow()}
    if until is not None:
        values["next_attempt_at"] = until
    JobRepository(session).transition(job_id, RUNNABLE_STATUSES, values)


def backoff_seconds(
    attempt: int, settings: Settings, retry_after: float | None, rng: random.Random | None = None
) -> float:
    """Exponential backoff with equal jitter, never shorter than the upstream's retry-after."""
    rng = rng or random.Random()
    ceiling = min(settings.retry_max_seconds, settings.retry_base_seconds * 2 ** (attempt - 1))
    delay = ceiling / 2 + rng.uniform(0, ceiling / 2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def output_text(message: dict[str, Any]) -> str:
    blocks = message.get("content") or []
    return "".join(
        block.get("text", "")
        for block in blocks
        if isinstance(block, dict) and block.get("type") == "text"
    )


def record_attempt(
    session: Session,
    settings: Settings,
    prices: PriceTable,
    claimed: ClaimedJob,
    result: UpstreamResult,
) -> AttemptVerdict:
    repository = JobRepository(session)
    now = utcnow()
    repository.add_attempt(
        Attempt(
            job_id=claimed.id,
            number=claimed.attempt,
            started_at=claimed.claimed_at,
            finished_at=now,
            latency_ms=result.latency_ms,
            outcome=result.outcome,
            status_code=result.status_code,
            upstream_request_id=result.request_id,
            error_type=result.error_type,
            error_message=result.error_message,
            # Its rollup is written in this transaction, below.
            accounted=1,
        )
    )
    common: dict[str, Any] = {
        "updated_at": now,
        "lease_expires_at": None,
        "upstream_status": result.status_code,
    }
    if result.outcome is Outcome.SUCCEEDED:
        assert result.message is not None
        verdict = AttemptVerdict(JobStatus.SUCCEEDED)
        values = {
            **common,
            **_success_values(claimed, result.message, prices),
            "finished_at": now,
            # Its end is counted in this transaction (end_events, the ledger below).
            "accounted": 1,
        }
    elif result.outcome is Outcome.TRANSIENT and claimed.attempt < settings.max_attempts:
        retry_in = backoff_seconds(claimed.attempt, settings, result.retry_after)
        verdict = AttemptVerdict(JobStatus.RETRYING, retry_in=retry_in)
        values = {
            **common,
            **_error_values(result),
            "status": JobStatus.RETRYING,
            "next_attempt_at": now + timedelta(seconds=retry_in),
        }
    else:
        verdict = AttemptVerdict(JobStatus.FAILED)
        values = {
            **common,
            **_error_values(result),
            "status": JobStatus.FAILED,
            "finished_at": now,
            "accounted": 1,
        }
        if result.outcome is Outcome.TRANSIENT:
            values["error_message"] = (
                f"gave up after {claimed.attempt} attempts; last error: {result.error_message}"
            )
    # Only a claim still held may be settled, with one exception: a success that lands after
    # the sweeper took the job back (a lease lost to a stalled heartbeat) is still the answer,
    # already paid for, and is kept rather than asked for again.
    settle_from = [JobStatus.RUNNING]
    if verdict.status is JobStatus.SUCCEEDED:
        settle_from.append(JobStatus.RETRYING)
    settled = repository.transition(claimed.id, settle_from, values)
    if settled and verdict.status.is_final:
        # First loaded in this session after the update above, so already current.
        job = repository.get(claimed.id)
        assert job is not None
        end_events(session, settings, job)
    elif settled and verdict.retry_in is not None:
        outbox.publish_job(session, claimed.id, claimed.priority, verdict.retry_in)
    # The rollups and the ledger in this transaction: the call is counted with its attempt
    # row (written whether or not the job was still ours), the cost only when the compare-
    # and-set above won, exactly when the job holds it. Last, and always in this order
    # (job, batch, usage, attempts, ledger), so that their rows' locks, shared by the key's
    # other jobs, last only until the commit that follows and are never taken in opposite
    # orders.
    rollups.attempt_recorded(
        session,
        claimed.api_key_id,
        claimed.model,
        now,
        result.outcome,
        result.status_code,
        result.latency_ms,
    )
    cost = values.get("cost_total")
    if settled and verdict.status.is_final and cost is not None:
        budgets.record_spend(session, claimed.api_key_id, now, cost)
    if not settled:
        return AttemptVerdict(JobStatus.RUNNING)
    return verdict


def _error_values(result: UpstreamResult) -> dict[str, Any]:
    return {
        "error_type": result.error_type or "upstream_error",
        "error_message": result.error_message or "the upstream call failed",
    }


def _success_values(
    claimed: ClaimedJob, message: dict[str, Any], prices: PriceTable
) -> dict[str, Any]:
    usage = Usage.from_message(message)
    values: dict[str, Any] = {
        "status": JobStatus.SUCCEEDED,
        "result": message,
        "output_text": output_text(message),
        "error_type": None,
        "error_message": None,
        **usage.to_api(),
    }
    model_prices = prices.prices_for(claimed.model)
    if model_prices is not None:
        cost = cost_of(usage, model_prices)
        values.update(
            cost_input=cost.input,
            cost_output=cost.output,
            cost_cache_write=cost.cache_write,
            cost_cache_read=cost.cache_read,
            cost_total=cost.total,
            prices=model_prices.to_dict(),
        )
    return values
