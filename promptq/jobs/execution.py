"""The worker side of a job: decide whether it may run, claim it, then record what one
upstream call gave.

The upstream call itself happens between the two, outside any database transaction, so a
slow upstream never holds a connection or a lock. What an attempt or an end sets off (the
retry's message, the word to waiters, the webhook deliveries) is recorded on the session and
sent once it commits (promptq.outbox).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from promptq import budgets, outbox, rollups
from promptq.batches.service import count_ended, request_ended
from promptq.clock import utcnow
from promptq.config import Settings
from promptq.db import on_postgresql
from promptq.jobs.end_effects import end_events
from promptq.jobs.recording import Record, record_in_one
from promptq.jobs.repository import CLAIM_COLUMNS, CLAIMED_ROW_COLUMNS, JobRepository
from promptq.models import RUNNABLE_STATUSES, DeliveryStatus, Job, JobStatus
from promptq.pricing import PriceTable, cost_of
from promptq.rollups import COST_COLUMNS, TOKEN_COLUMNS, EndedJob, RecordedAttempt
from promptq.upstream import Outcome, UpstreamResult
from promptq.usage import Usage
from promptq.webhooks import deliveries


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
    batch_id: str | None = None
    webhook_url: str | None = None


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
    batch_id: str | None = None
    webhook_url: str | None = None
    # The key has a monthly budget: the job holds a reservation until its attempt ends.
    budgeted: bool = False
    # The key had a webhook subscription in force when the job was claimed (known only on
    # the common job's way, claim_ready_job; None: not known).
    key_subscribed: bool | None = None
    # The job's row as the claim left it (column: value) and its key's webhook signing
    # secret, on the common job's way: what the event of its end is built from, without
    # reading the job again (_end_deliveries). None: read then.
    row: Mapping[str, Any] | None = None
    webhook_secret: str | None = None


@dataclass(frozen=True)
class AttemptVerdict:
    status: JobStatus
    # Seconds until the next attempt, when the job is to be retried (its message, with this
    # countdown, goes once the attempt commits).
    retry_in: float | None = None
    # The job ended with a record that ran alone (records_alone), and its key subscribed
    # while the call ran: its subscriptions' deliveries are still to be written
    # (deliver_to_subscribers, in a transaction of its own).
    subscribers_owed: bool = False
    # Deliveries of its end claimed as they were written, for the `room` given to
    # record_attempt to send once the record has committed (DeliveryRoom.hand_over).
    handed_over: tuple[deliveries.PreparedDelivery, ...] = ()


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
        batch_id=job.batch_id,
        webhook_url=job.webhook_url,
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
    """Take the job for one attempt; None when another delivery took it first. The job was
    read first (runnable_job): the long way, see claim_ready_job."""
    now = utcnow()
    lease_until = now + timedelta(seconds=settings.claim_lease_seconds)
    if not JobRepository(session).claim(job.id, now, lease_until):
        return None
    return _claimed(job, now)


def _claimed(job: RunnableJob, now: datetime) -> ClaimedJob:
    """The attempt a claim at `now` makes of the job, read as it was before the claim."""
    return ClaimedJob(
        id=job.id,
        api_key_id=job.api_key_id,
        model=job.model,
        request=job.request,
        priority=job.priority,
        attempt=job.attempts + 1,
        claimed_at=now,
        anthropic_beta=job.anthropic_beta,
        batch_id=job.batch_id,
        webhook_url=job.webhook_url,
        budgeted=job.key_monthly_budget_usd is not None,
    )


def claim_ready_job(
    session: Session, settings: Settings, job_id: str
) -> tuple[RunnableJob, ClaimedJob] | None:
    """Claim the job in one statement when it is runnable, due, its key not revoked and
    not holding it to an rpm (JobRepository.claim_ready): the job as admission sees it and
    as the attempt sees it. None when it was not claimed: gone, running or finished, not
    yet due, its key revoked or its rpm to be taken first; runnable_job then says which."""
    now = utcnow()
    lease_until = now + timedelta(seconds=settings.claim_lease_seconds)
    row = JobRepository(session).claim_ready(job_id, now, lease_until)
    if row is None:
        return None
    named = len(CLAIM_COLUMNS)
    (_, api_key_id, model, request, priority, attempts, beta, batch_id, webhook_url) = row[:named]
    budget, quotas, subscribed, webhook_secret = row[named : named + 4]
    runnable = RunnableJob(
        id=job_id,
        model=model,
        request=request,
        priority=priority,
        # As it was before this claim counted one.
        attempts=attempts - 1,
        api_key_id=api_key_id,
        key_rpm=None,
        waiting_for=None,
        due_in=0.0,
        key_monthly_budget_usd=budget,
        anthropic_beta=beta,
        key_high_priority_waiting=(quotas or {}).get("high_priority_waiting"),
        batch_id=batch_id,
        webhook_url=webhook_url,
    )
    claimed = replace(_claimed(runnable, now), key_subscribed=bool(subscribed))
    if webhook_url is not None or subscribed:
        # Only a job whose end has an event to send keeps its row (_end_deliveries).
        as_claimed = dict(
            zip(CLAIM_COLUMNS + CLAIMED_ROW_COLUMNS, row[:named] + row[named + 4 :], strict=True)
        )
        claimed = replace(claimed, row=as_claimed, webhook_secret=webhook_secret)
    return runnable, claimed


def records_alone(settings: Settings, claimed: ClaimedJob) -> bool:
    """Whether the attempt's record is one statement that sets off nothing else in the
    database: on PostgreSQL (promptq.jobs.recording), outside a batch and with no budget to
    release. Such a record needs no transaction around it: run on a connection in
    autocommit it saves the BEGIN and COMMIT round trips, two of a job's six with
    PostgreSQL, and the rollups' rows it shares with its key's other jobs are locked only
    while it runs. The webhook deliveries of the job's end are in it; should its key have
    subscribed while the call ran, after the claim said it had no subscription, those
    deliveries follow it in a transaction of their own, a moment after it rather than with
    it (AttemptVerdict.subscribers_owed)."""
    return claimed.batch_id is None and not claimed.budgeted and on_postgresql(settings)


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
    room: deliveries.DeliveryRoom | None = None,
    answered_at: datetime | None = None,
) -> AttemptVerdict:
    """Record one upstream call: its attempt row, the job's next status (a compare-and-set
    from the claim), and, in this transaction, what that sets off (the job's end, its
    retry's message) and adds up to (the rollups, the spend ledger, the budget's release).

    On PostgreSQL, for a job outside any batch, all of the writes are one statement
    (promptq.jobs.recording); elsewhere one statement each, in the same order. `room`, for
    a record that commits as it runs (records_alone): the deliveries of the job's end it
    has room for are claimed as they are written, for the caller to hand over to it
    (AttemptVerdict.handed_over) rather than published.

    `answered_at`, when the answer came (now if not given), is when the attempt finished:
    the record may have waited for its turn (JobRunner.record_turns) or through a database
    outage since. The job itself finishes now, as it is recorded: a poller of the most
    recently finished jobs (order=finished) reads only its first page, and a job recorded
    after a database outage with its answer's time would land behind every job that other
    workers finished meanwhile, where such a poller may never look."""
    now = utcnow()
    answered = answered_at or now
    attempt = {
        "job_id": claimed.id,
        "number": claimed.attempt,
        "started_at": claimed.claimed_at,
        "finished_at": answered,
        "latency_ms": result.latency_ms,
        "outcome": result.outcome,
        "status_code": result.status_code,
        "upstream_request_id": result.request_id,
        "error_type": result.error_type,
        "error_message": result.error_message,
        # Its rollup is written in this transaction, below.
        "accounted": 1,
    }
    verdict, values = _next_state(settings, prices, claimed, result, now)
    final = verdict.status.is_final
    if final and claimed.webhook_url is not None and claimed.batch_id is None:
        # Its delivery is created below, with the job's end (deliveries.job_event).
        values["webhook_status"] = DeliveryStatus.PENDING
    # Only a claim still held may be settled, with one exception: a success that lands after
    # the sweeper took the job back (a lease lost to a stalled heartbeat) is still the answer,
    # already paid for, and is kept rather than asked for again.
    settle_from = [JobStatus.RUNNING]
    if verdict.status is JobStatus.SUCCEEDED:
        settle_from.append(JobStatus.RETRYING)
    cost = values.get("cost_total") if final else None
    record = Record(
        job_id=claimed.id,
        api_key_id=claimed.api_key_id,
        attempt=attempt,
        settle_from=settle_from,
        values=values,
        call=RecordedAttempt(
            claimed.api_key_id,
            claimed.model,
            answered,
            result.outcome,
            result.status_code,
            result.latency_ms,
        ),
        ended=_ended(claimed, verdict.status, values, now) if final else None,
        spend=cost,
        finished_at=now,
    )
    # The rollups and the ledger in this transaction: the call is counted with its attempt
    # row (written whether or not the job was still ours), the end and the cost only when
    # the compare-and-set won, exactly when the job holds them. Last, and always in this
    # order (job, batch, usage, attempts, ledger), so that their rows' locks, shared by the
    # key's other jobs, last only until the commit that follows and are never taken in
    # opposite orders. On PostgreSQL what the job's end writes besides (its deliveries) is
    # in the same one statement, with nothing after it to hold those locks longer.
    if claimed.batch_id is None and on_postgresql(session):
        handed: list[deliveries.PreparedDelivery] = []
        if final:
            rows, handed = _end_deliveries(session, claimed, values, room)
            if rows:
                record = replace(record, deliveries=rows)
        try:
            settled, subscribed, revoked = record_in_one(session, record)
        except BaseException:
            _give_room_back(room, handed)
            raise
        claimed_here = {prepared.id for prepared in handed}
        if revoked and handed:
            # Its key was revoked during the call: nothing is sent. The deliveries, written
            # claimed, fall due once their claims' leases run out, and their sender then
            # finds the key revoked (deliveries.take) and fails them.
            _give_room_back(room, handed)
            handed = []
        if not (settled and final):
            _give_room_back(room, handed)
        else:
            # Not more statements here: they would run outside the record's transaction
            # when there is none (records_alone), and a retry of the whole after one of
            # them failed would record the attempt twice.
            outbox.announce_finished(session, claimed.id)
            for delivery in record.deliveries:
                if delivery["id"] not in claimed_here:
                    outbox.deliver_webhook(session, delivery["id"])
            verdict = replace(
                verdict,
                subscribers_owed=subscribed and claimed.key_subscribed is False,
                handed_over=tuple(handed),
            )
    else:
        repository = JobRepository(session)
        repository.insert_attempt(attempt)
        settled, subscribed = repository.settle(claimed.id, settle_from, values)
        if settled and final:
            job = _announce_and_deliver(session, claimed, subscribed)
            if job is not None and job.batch_id is not None:
                request_ended(session, settings, job)
            assert record.ended is not None
            rollups.jobs_ended(session, [record.ended])
        rollups.attempts_recorded(session, [record.call])
        if settled and cost is not None:
            budgets.record_spend(session, claimed.api_key_id, now, cost)
    if settled and verdict.retry_in is not None:
        outbox.publish_job(session, claimed.id, claimed.priority, verdict.retry_in)
    if not settled:
        return AttemptVerdict(JobStatus.RUNNING)
    return verdict


def _next_state(
    settings: Settings,
    prices: PriceTable,
    claimed: ClaimedJob,
    result: UpstreamResult,
    now: datetime,
) -> tuple[AttemptVerdict, dict[str, Any]]:
    """What the attempt makes of the job: its verdict, and the job's columns to write."""
    common: dict[str, Any] = {
        "updated_at": now,
        "lease_expires_at": None,
        "upstream_status": result.status_code,
    }
    if result.outcome is Outcome.SUCCEEDED:
        assert result.message is not None
        return AttemptVerdict(JobStatus.SUCCEEDED), {
            **common,
            **_success_values(claimed, result.message, prices),
            "finished_at": now,
            # Its end is counted in this transaction (the rollup, the ledger).
            "accounted": 1,
        }
    if result.outcome is Outcome.TRANSIENT and claimed.attempt < settings.max_attempts:
        retry_in = backoff_seconds(claimed.attempt, settings, result.retry_after)
        return AttemptVerdict(JobStatus.RETRYING, retry_in=retry_in), {
            **common,
            **_error_values(result),
            "status": JobStatus.RETRYING,
            "next_attempt_at": now + timedelta(seconds=retry_in),
        }
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
    return AttemptVerdict(JobStatus.FAILED), values


def _ended(
    claimed: ClaimedJob, status: JobStatus, values: dict[str, Any], now: datetime
) -> EndedJob:
    """The job's end as its hour's rollup counts it, from the columns the attempt writes (an
    ending attempt writes every one it counts: tokens and costs only on success, and a job
    carries none of them before its success)."""
    costs = None
    if values.get("cost_total") is not None:
        costs = tuple(values.get(column) or Decimal(0) for column in COST_COLUMNS)
    tokens = tuple(int(values.get(column) or 0) for column in TOKEN_COLUMNS)
    return EndedJob(
        api_key_id=claimed.api_key_id,
        model=claimed.model,
        status=status,
        finished_at=now,
        tokens=tokens,  # type: ignore[arg-type]
        costs=costs,  # type: ignore[arg-type]
    )


def deliver_to_subscribers(session: Session, job_id: str) -> None:
    """The deliveries a job's end owes its key's subscriptions when its record could not
    write them (AttemptVerdict.subscribers_owed): its own webhook_url's went with it."""
    job = JobRepository(session).get(job_id)
    if job is not None:
        deliveries.job_event(session, job, subscribed=True, own_webhook=False)


def _end_deliveries(
    session: Session,
    claimed: ClaimedJob,
    values: dict[str, Any],
    room: deliveries.DeliveryRoom | None,
) -> tuple[list[dict[str, Any]], list[deliveries.PreparedDelivery]]:
    """The rows of the deliveries the job's end creates, for its record to write
    (promptq.jobs.recording): to its webhook_url, and to its key's subscriptions unless the
    claim found none. Their event's body is the job as the record leaves it, made before the
    record from the row the claim returned (or, claimed the long way, read): the job is the
    worker's while it holds the claim. Those `room` has room for are claimed as they are
    written, to be handed over to it once they are (the second part)."""
    if claimed.webhook_url is None and claimed.key_subscribed is False:
        return [], []
    if claimed.row is not None and claimed.webhook_secret is not None:
        # From the claim's row: no statement more, and one wait for the database fewer
        # between the answer and the POST. Whether the key was revoked meanwhile the record
        # says (record_attempt).
        job = JobRepository.as_written_from(claimed.row, values)
        secret = claimed.webhook_secret
    else:
        found = JobRepository(session).as_written(claimed.id, values)
        if found is None:
            return [], []
        if found.key_revoked:
            room = None
        job, secret = found.job, found.webhook_secret
    subscribed = claimed.key_subscribed is not False
    rows = deliveries.job_event_rows(session, job, subscribed=subscribed)
    handed: list[deliveries.PreparedDelivery] = []
    if room is not None:
        for row in rows:
            if not room.take_room(row["api_key_id"]):
                break
            handed.append(deliveries.claim_at_creation(row, secret))
    return rows, handed


def _give_room_back(
    room: deliveries.DeliveryRoom | None, handed: list[deliveries.PreparedDelivery]
) -> None:
    if room is not None:
        for prepared in handed:
            room.give_room_back(prepared.key_id)


def _announce_and_deliver(session: Session, claimed: ClaimedJob, subscribed: bool) -> Job | None:
    """The job's end as end_events sets it off, less its rollup (written by the caller):
    the word to its waiters, and its webhook deliveries. The job is loaded only when
    something needs it (a webhook, a subscription, a batch): the common job has none."""
    outbox.announce_finished(session, claimed.id)
    if claimed.webhook_url is None and not subscribed and claimed.batch_id is None:
        return None
    job = JobRepository(session).get(claimed.id)
    assert job is not None
    deliveries.job_event(session, job, subscribed=subscribed)
    return job


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
