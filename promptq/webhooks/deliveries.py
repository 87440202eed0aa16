"""Webhook deliveries: created with the event, in the same transaction as the job's end, so
none is lost; sent and retried from the database on the contract's schedule, every
attempt a row of its own."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import literal_column, or_, select, update
from sqlalchemy.orm import Session

from promptq import outbox
from promptq.clock import utcnow
from promptq.config import Settings
from promptq.db import on_postgresql
from promptq.ids import new_id
from promptq.jobspec.presenter import isoformat, job_to_api
from promptq.models import ApiKey, DeliveryStatus, Job, WebhookAttempt, WebhookDelivery
from promptq.rollups import webhook_attempt_recorded, webhook_attempt_rows
from promptq.webhooks import subscriptions
from promptq.webhooks.recording import AttemptRecord, record_in_one
from promptq.webhooks.sender import DeliveryResult
from promptq.webhooks.signing import sign

# Seconds to wait after each failed attempt: about 5 s, 5 min, 30 min, 2 h, 5 h, 10 h.
RETRY_SCHEDULE = (5, 300, 1800, 7200, 18000, 36000)
# How long a worker owns a delivery it is sending; past this another may send it.
SENDING_LEASE = timedelta(seconds=60)
GONE = subscriptions.GONE


@dataclass(frozen=True)
class PreparedDelivery:
    id: str
    url: str
    body: bytes
    headers: dict[str, str]
    attempt: int
    key_id: str
    job_id: str | None = None
    subscription_id: str | None = None


class DeliveryRoom(Protocol):
    """Where the process that creates a delivery may send its first attempt itself, claimed
    as it is written, rather than publish it for a sender to claim (one round trip through
    Redis and one transaction fewer on the way to the receiver): the worker's delivery
    pool (worker.deliveries.DeliveryPool)."""

    def take_room(self, key_id: str) -> bool:
        """Whether the sender takes one more delivery of this key, claimed, to send at once
        or once the key's share of its POSTs has room; False: publish it instead."""
        ...

    def give_room_back(self, key_id: str) -> None:
        """The delivery was not written after all."""
        ...

    def hand_over(self, prepared: PreparedDelivery) -> None:
        """Send the delivery, written and claimed (claim_at_creation), in the room taken."""
        ...


def claim_at_creation(row: dict[str, Any], secret: str) -> PreparedDelivery:
    """Make a delivery's row, not yet written, claimed for its first attempt as take() claims
    one (its lease running, the attempt counted), and prepare that attempt: for the process
    that writes it and then sends it itself. Should that process die before the attempt is
    recorded, the delivery falls due once the lease runs out, as after any lost sender."""
    row["attempts"] = 1
    row["next_attempt_at"] = row["created_at"] + SENDING_LEASE
    body = row["body"].encode()
    return PreparedDelivery(
        row["id"],
        row["url"],
        body,
        _headers(secret, row["event_id"], row["created_at"], body),
        1,
        row["api_key_id"],
        row["job_id"],
        row["subscription_id"],
    )


def job_event(
    session: Session, job: Job, subscribed: bool = True, own_webhook: bool = True
) -> None:
    """Create the deliveries of a job's end: to its webhook_url and to every subscription of
    its key that wants the event, sent once the session commits. A batch's requests send
    none of their own (a batch of 10,000 would make 10,000 calls): the batch announces its
    end. `subscribed=False`: the caller knows, from this transaction, that the key has no
    subscription in force (promptq.jobs.repository.JobRepository.settle), so they are not
    looked up. `own_webhook=False`: the job's own webhook_url was sent its event already
    (promptq.jobs.execution.deliver_to_subscribers)."""
    rows = job_event_rows(session, job, subscribed, own_webhook)
    own = rows and own_webhook and job.webhook_url is not None
    if own and job.webhook_status != DeliveryStatus.PENDING:  # set already by a job's end
        job.webhook_status = DeliveryStatus.PENDING
    _create(session, rows)


def job_event_rows(
    session: Session, job: Job, subscribed: bool = True, own_webhook: bool = True
) -> list[dict[str, Any]]:
    """The rows of job_event's deliveries (column: value), written by nobody yet: for a
    caller that writes them in a statement of its own and sends each once it commits
    (promptq.jobs.recording)."""
    if job.status not in ("succeeded", "failed") or job.batch_id is not None:
        return []
    event_type = f"job.{job.status}"
    targets: list[tuple[str, str | None]] = []
    if subscribed:
        targets = [
            (s.url, s.id) for s in subscriptions.listening(session, job.api_key_id, event_type)
        ]
    if own_webhook and job.webhook_url is not None:
        targets.insert(0, (job.webhook_url, None))
    if not targets:
        return []
    return _event_rows(job.api_key_id, event_type, job_to_api(job), targets, job.id)


def batch_event(session: Session, api_key_id: str, batch: dict[str, Any]) -> None:
    """Create the `batch.ended` deliveries of a batch, to every subscription that wants it."""
    targets: list[tuple[str, str | None]] = [
        (s.url, s.id) for s in subscriptions.listening(session, api_key_id, "batch.ended")
    ]
    _create(session, _event_rows(api_key_id, "batch.ended", batch, targets))


def _event_rows(
    api_key_id: str,
    event_type: str,
    data: dict[str, Any],
    targets: list[tuple[str, str | None]],
    job_id: str | None = None,
) -> list[dict[str, Any]]:
    """One delivery per (url, subscription id) target, all of the same body, each its own
    event id, due now; every column of its row but finished_at."""
    now = utcnow()
    body = json.dumps(
        {"type": event_type, "timestamp": isoformat(now), "data": data}, separators=(",", ":")
    )
    return [
        {
            "id": new_id("dlv"),
            "event_id": new_id("msg"),
            "job_id": job_id,
            "api_key_id": api_key_id,
            "subscription_id": subscription_id,
            "url": url,
            "event_type": event_type,
            "body": body,
            "attempts": 0,
            "status": DeliveryStatus.PENDING,
            "next_attempt_at": now,
            "created_at": now,
        }
        for url, subscription_id in targets
    ]


def _create(session: Session, rows: list[dict[str, Any]]) -> None:
    """Write the deliveries, each sent once the session commits."""
    if not rows:
        return
    session.add_all([WebhookDelivery(**row) for row in rows])
    session.flush()
    for row in rows:
        outbox.deliver_webhook(session, row["id"])


def redeliver(session: Session, job: Job) -> WebhookDelivery | None:
    """Send a job's last event again, as the same event (same webhook-id), once the
    session commits."""
    last = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job.id, WebhookDelivery.subscription_id.is_(None))
        .order_by(WebhookDelivery.created_at.desc())
        .limit(1)
    ).first()
    if last is None:
        return None
    again = WebhookDelivery(
        id=new_id("dlv"),
        event_id=last.event_id,
        job_id=job.id,
        api_key_id=last.api_key_id,
        url=last.url,
        event_type=last.event_type,
        body=last.body,
        attempts=0,
        status=DeliveryStatus.PENDING,
        next_attempt_at=utcnow(),
    )
    session.add(again)
    job.webhook_status = DeliveryStatus.PENDING
    session.flush()
    outbox.deliver_webhook(session, again.id)
    return again


def stop_pending_of_key(session: Session, api_key_id: str) -> int:
    """End every delivery of the key still to be sent (its revocation): they fail."""
    statement = (
        update(WebhookDelivery)
        .where(
            WebhookDelivery.api_key_id == api_key_id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
        )
        .values(status=DeliveryStatus.FAILED, finished_at=utcnow(), next_attempt_at=None)
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).rowcount  # type: ignore[attr-defined]


def postpone(session: Session, delivery_id: str, seconds: float) -> None:
    """Put a pending delivery that found no room to be sent at the back of the due ones,
    without counting an attempt: the sweeper publishes it again once due."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.PENDING)
        .values(next_attempt_at=utcnow() + timedelta(seconds=seconds))
        .execution_options(synchronize_session=False)
    )


def unclaim(session: Session, delivery_ids: Sequence[str]) -> None:
    """Give back the claims of deliveries claimed at their creation for a first attempt
    that was never made (a worker stopping with deliveries handed over and not yet sent):
    due at once, that attempt not counted. One another sender took since, its lease having
    run out, counts a second attempt and is left alone."""
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id.in_(delivery_ids),
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.attempts == 1,
        )
        .values(next_attempt_at=utcnow(), attempts=0)
        .execution_options(synchronize_session=False)
    )


def take(session: Session, delivery_id: str) -> PreparedDelivery | None:
    """Claim a due delivery for one attempt (a compare-and-set, so a duplicate message
    sends nothing) and sign it; None when it is not pending or not due.

    One statement: the claim returns what the attempt needs, its key's secret included (a
    correlated subquery, which SQLite's RETURNING allows where it refuses UPDATE ... FROM's
    tables). Rolling the session back undoes the claim: what a sender does that finds no
    room for the delivery's key."""
    now = utcnow()
    key = select(ApiKey).where(ApiKey.id == WebhookDelivery.api_key_id)
    claimed = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
            or_(WebhookDelivery.next_attempt_at.is_(None), WebhookDelivery.next_attempt_at <= now),
        )
        .values(next_attempt_at=now + SENDING_LEASE, attempts=WebhookDelivery.attempts + 1)
        .returning(
            WebhookDelivery.api_key_id,
            WebhookDelivery.event_id,
            WebhookDelivery.url,
            WebhookDelivery.body,
            WebhookDelivery.attempts,
            WebhookDelivery.job_id,
            WebhookDelivery.subscription_id,
            key.with_only_columns(ApiKey.webhook_secret).scalar_subquery(),
            key.with_only_columns(ApiKey.revoked_at).scalar_subquery(),
        )
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if claimed is None:
        return None
    key_id, event_id, url, text_body, attempts, job_id, subscription_id, secret, revoked_at = (
        claimed
    )
    if revoked_at is not None:
        # Made after the revocation (a job already at the upstream then ended): not sent.
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(status=DeliveryStatus.FAILED, finished_at=now)
            .execution_options(synchronize_session=False)
        )
        return None
    body = text_body.encode()
    return PreparedDelivery(
        delivery_id,
        url,
        body,
        _headers(secret, event_id, now, body),
        attempts,
        key_id,
        job_id,
        subscription_id,
    )


def _headers(secret: str, event_id: str, now: datetime, body: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "user-agent": "promptq-webhooks/1",
        **sign(secret, event_id, now, body),
    }


def next_delay(attempt: int, result: DeliveryResult) -> float | None:
    """Seconds until the next attempt after a failed one, or None when it was the last."""
    if result.status_code == GONE or attempt > len(RETRY_SCHEDULE):
        return None
    delay = float(RETRY_SCHEDULE[attempt - 1])
    if result.retry_after is not None:
        delay = max(delay, result.retry_after)
    return delay


def record(
    session: Session, prepared: PreparedDelivery, result: DeliveryResult, started_at: datetime
) -> float | None:
    """Record one attempt; the seconds until the next one, or None when it is settled.
    Written blind, from what the claim returned: nothing is read first (but a
    subscription's health). On PostgreSQL one statement (promptq.webhooks.recording): give
    it a session in autocommit (records_alone)."""
    now = utcnow()
    delay = None if result.succeeded else next_delay(prepared.attempt, result)
    if prepared.subscription_id is not None:
        subscription_on = subscriptions.note_attempt(session, prepared.subscription_id, result, now)
        if not subscription_on:
            delay = None  # a disabled subscription is sent nothing more
    status: str = DeliveryStatus.PENDING
    values: dict[str, Any]
    if result.succeeded:
        status = DeliveryStatus.SUCCEEDED
        values = {"status": status, "finished_at": now}
    elif delay is None:
        status = DeliveryStatus.FAILED
        values = {"status": status, "finished_at": now}
    else:
        values = {"next_attempt_at": now + timedelta(seconds=delay)}
    own_job = prepared.job_id if prepared.subscription_id is None else None
    attempt_record = AttemptRecord(
        delivery_id=prepared.id,
        attempt={
            "delivery_id": prepared.id,
            "number": prepared.attempt,
            "started_at": started_at,
            "latency_ms": result.latency_ms,
            "status_code": result.status_code,
            "response_excerpt": result.response_excerpt,
            "error": result.error,
        },
        delivery=values,
        job_id=own_job,
        job={"webhook_status": status, "webhook_attempts": prepared.attempt, "updated_at": now},
        hourly=webhook_attempt_rows(
            now, attempt_outcome(result), status if status != DeliveryStatus.PENDING else None
        ),
    )
    if on_postgresql(session):
        record_in_one(session, attempt_record)
    else:
        _record_statements(session, attempt_record)
    return delay


def records_alone(settings: Settings) -> bool:
    """Whether an attempt's record is one statement (on PostgreSQL), which needs no
    transaction around it: the sender runs it in autocommit."""
    return on_postgresql(settings)


def _record_statements(session: Session, record: AttemptRecord) -> None:
    """record_in_one's writes, one statement each, in its order."""
    session.add(WebhookAttempt(**record.attempt))
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == record.delivery_id)
        .values(**record.delivery)
        .execution_options(synchronize_session=False)
    )
    if record.job_id is not None:
        session.execute(
            update(Job)
            .where(Job.id == record.job_id)
            .values(**record.job)
            .execution_options(synchronize_session=False)
        )
    webhook_attempt_recorded(session, record.hourly)


def attempt_outcome(result: DeliveryResult) -> str:
    """`succeeded`: a 2xx in time; `http_error`: any other answer; `no_response`: none came
    (refused, timed out, blocked as a private address)."""
    if result.status_code is None:
        return "no_response"
    return "succeeded" if result.succeeded else "http_error"


def due(session: Session, now: datetime, limit: int = 1000) -> Sequence[str]:
    query = (
        select(WebhookDelivery.id)
        .where(
            # A constant, as the partial index's WHERE says it (see models.is_active_job).
            WebhookDelivery.status == literal_column("'pending'"),
            WebhookDelivery.next_attempt_at <= now,
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )
    return session.scalars(query).all()


def for_job(session: Session, job_id: str) -> list[dict[str, Any]]:
    deliveries = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job_id)
        .order_by(WebhookDelivery.created_at)
    ).all()
    attempts = session.scalars(
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id.in_([d.id for d in deliveries]))
        .order_by(WebhookAttempt.id)
    ).all()
    return [
        {
            "id": d.id,
            "object": "webhook_delivery",
            "event_id": d.event_id,
            "event_type": d.event_type,
            "url": d.url,
            "status": d.status,
            "attempts": [
                {
                    "number": a.number,
                    "started_at": isoformat(a.started_at),
                    "latency_ms": a.latency_ms,
                    "status_code": a.status_code,
                    "response_excerpt": a.response_excerpt,
                    "error": a.error,
                }
                for a in attempts
                if a.delivery_id == d.id
            ],
            "next_attempt_at": isoformat(d.next_attempt_at)
            if d.status == DeliveryStatus.PENDING
            else None,
            "created_at": isoformat(d.created_at),
            "finished_at": isoformat(d.finished_at),
        }
        for d in deliveries
    ]
