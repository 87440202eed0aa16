"""The Message Batch lifecycle: create, read, list, cancel, delete, results, end, expiry.

A batch's requests are ordinary jobs (low priority by default) carrying its id, so they
are visible, priced and rate limited like any other; the batch ends when the last of them
does, and its end is the `batch.ended` webhook event. Services flush, never commit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from promptq import outbox, quotas
from promptq.batches.presenter import batch_to_api, result_line
from promptq.batches.repository import EXPIRED_ERROR, BatchRepository, outcome_of
from promptq.batches.schemas import BatchRequest
from promptq.budgets import check_budget, max_cost
from promptq.budgets.priceable import check_priceable
from promptq.clock import utcnow
from promptq.config import Settings
from promptq.errors import NotFound
from promptq.ids import new_id
from promptq.jobspec.errors import InvalidJob
from promptq.keys.policy import check_model
from promptq.models import ApiKey, BatchStatus, Job, JobStatus, MessageBatch, Priority
from promptq.pricing import settings_prices
from promptq.rollups import EndedJob, jobs_ended
from promptq.webhooks import deliveries

# Anthropic's: a batch's requests not finished within 24 hours expire.
BATCH_LIFETIME = timedelta(hours=24)
RESULTS_PAGE = 1000


class BatchNotFound(NotFound):
    pass


@dataclass(frozen=True)
class BatchView:
    batch: MessageBatch

    def to_api(self, base_url: str) -> dict[str, Any]:
        return batch_to_api(self.batch, base_url)


def create_batch(
    session: Session,
    settings: Settings,
    key: ApiKey,
    requests: Sequence[BatchRequest],
    anthropic_beta: str | None = None,
) -> BatchView:
    """The batch and one job per request; once the session commits, one message feeds its
    requests to the queue (and its `batch.ended` deliveries go when it ended at once, every
    request invalid)."""
    quotas.check_unfinished_jobs(session, settings, key, adding=len(requests))
    prices = settings_prices(settings)
    dearest = None
    for request in requests:
        if request.error is None:
            where = f"requests[custom_id={request.custom_id}]"
            check_model(key, request.model, where)
            check_priceable(key, request.params, prices, anthropic_beta, where)
            if key.monthly_budget_usd is not None:
                cost = max_cost(request.params, request.model, prices)
                dearest = cost if dearest is None else max(dearest, cost)
    # Each request is reserved on its own when it starts: none may be beyond the budget.
    check_budget(session, key, cost=dearest)
    now = utcnow()
    batch = MessageBatch(
        id=new_id("msgbatch"),
        api_key_id=key.id,
        processing_status=BatchStatus.IN_PROGRESS,
        request_count=len(requests),
        created_at=now,
        expires_at=now + BATCH_LIFETIME,
    )
    # Sorted, so that job ids (ULIDs made within the same millisecond are not ordered)
    # follow the order of the requests, and results come back in that order.
    job_ids = sorted(new_id("job") for _ in requests)
    jobs = [
        _job_row(job_id, batch.id, key.id, request, settings, now, anthropic_beta)
        for job_id, request in zip(job_ids, requests, strict=True)
    ]
    # Invalid requests are errored from the start; the others are processing.
    errored = sum(1 for row in jobs if row["status"] == JobStatus.FAILED)
    batch.processing_count = len(jobs) - errored
    batch.errored_count = errored
    BatchRepository(session).add(batch, jobs)
    jobs_ended(
        session,
        [
            EndedJob(key.id, row["model"], row["status"], now)
            for row in jobs
            if row["status"] == JobStatus.FAILED
        ],
    )
    outbox.feed_batch(session, batch.id)
    end_if_finished(session, settings, batch.id)
    return BatchView(batch)


def _job_row(
    job_id: str,
    batch_id: str,
    key_id: str,
    request: BatchRequest,
    settings: Settings,
    now: Any,
    anthropic_beta: str | None,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": job_id,
        "api_key_id": key_id,
        "status": JobStatus.QUEUED,
        "model": request.model[:200],
        "priority": Priority.LOW,
        "request": request.params,
        "attempts": 0,
        "max_attempts": settings.max_attempts,
        "created_at": now,
        "updated_at": now,
        "webhook_attempts": 0,
        "batch_id": batch_id,
        "custom_id": request.custom_id,
        "anthropic_beta": anthropic_beta,
        "accounted": 0,
    }
    if request.error is not None:
        row.update(
            status=JobStatus.FAILED,
            finished_at=now,
            # Counted at creation, with the batch's errored count and the rollups.
            accounted=1,
            error_type="invalid_request_error",
            error_message=request.error,
            upstream_status=400,
        )
    return row


def get_batch(session: Session, key: ApiKey, batch_id: str) -> BatchView:
    repository = BatchRepository(session)
    batch = repository.get_for_key(batch_id, key.id)
    if batch is None:
        raise BatchNotFound(f"no message batch {batch_id!r} for this API key")
    return BatchView(batch)


def list_batches(
    session: Session, key: ApiKey, limit: int, after_id: str | None, before_id: str | None
) -> tuple[list[BatchView], bool]:
    if after_id is not None and before_id is not None:
        raise InvalidJob("give after_id or before_id, not both")
    repository = BatchRepository(session)
    rows = list(repository.page_for_key(key.id, limit + 1, after_id, before_id))
    has_more = len(rows) > limit
    if has_more:
        # Paging back (before_id) keeps the newest-first order: the extra row is the newest.
        rows = rows[1:] if before_id is not None else rows[:limit]
    return [BatchView(batch) for batch in rows], has_more


def cancel_batch(session: Session, settings: Settings, key: ApiKey, batch_id: str) -> BatchView:
    """Requests not yet started are canceled; running ones finish; the batch is `canceling`
    until they have, then `ended`."""
    view = get_batch(session, key, batch_id)
    if view.batch.processing_status == BatchStatus.IN_PROGRESS:
        now = utcnow()
        repository = BatchRepository(session)
        canceled = repository.end_runnable(
            batch_id,
            {
                "status": JobStatus.CANCELED,
                "finished_at": now,
                "updated_at": now,
                "next_attempt_at": None,
                "error_type": "canceled",
                "error_message": "the batch was canceled before this request ran",
            },
        )
        repository.count_ended(batch_id, {"canceled": len(canceled)})
        _rollup(session, canceled, now)
        batch = repository.lock(batch_id)
        assert batch is not None
        if batch.processing_status == BatchStatus.IN_PROGRESS:
            batch.processing_status = BatchStatus.CANCELING
            batch.cancel_initiated_at = now
        session.flush()
    end_if_finished(session, settings, batch_id)
    return get_batch(session, key, batch_id)


def delete_batch(session: Session, key: ApiKey, batch_id: str) -> None:
    view = get_batch(session, key, batch_id)
    if view.batch.processing_status != BatchStatus.ENDED:
        raise InvalidJob(
            f"message batch {batch_id} is {view.batch.processing_status}; only an ended "
            "batch can be deleted: cancel it first, then delete it once it has ended"
        )
    view.batch.deleted_at = utcnow()
    session.flush()


def end_if_finished(session: Session, settings: Settings, batch_id: str) -> None:
    """Mark the batch ended when none of its requests is left to finish, with its
    `batch.ended` deliveries (sent once the session commits). Called wherever a batch's
    request may have been its last: a recorded attempt, a cancel, an expiry, a worker lost
    for good."""
    repository = BatchRepository(session)
    batch = repository.lock(batch_id)
    if batch is None or batch.processing_status == BatchStatus.ENDED:
        return
    if batch.processing_count > 0:
        return
    batch.processing_status = BatchStatus.ENDED
    batch.ended_at = utcnow()
    session.flush()
    body = batch_to_api(batch, settings.webhook_base_url)
    deliveries.batch_event(session, batch.api_key_id, body)


def request_ended(session: Session, settings: Settings, job: Job) -> None:
    """Count a batch request that has just ended (its compare-and-set to a final status
    won, in this transaction) and end the batch if it was the last."""
    assert job.batch_id is not None
    count_ended(session, job.batch_id, outcome_of(job.status, job.error_type))
    end_if_finished(session, settings, job.batch_id)


def count_ended(session: Session, batch_id: str, outcome: str, count: int = 1) -> None:
    BatchRepository(session).count_ended(batch_id, {outcome: count})


def _rollup(session: Session, canceled: list[tuple[str, str]], at: Any) -> None:
    """Requests ended unstarted (a cancel, an expiry) are canceled jobs in the rollups."""
    jobs_ended(
        session, [EndedJob(key_id, model, JobStatus.CANCELED, at) for key_id, model in canceled]
    )


def expire_and_close(session: Session, settings: Settings, limit: int = 100) -> None:
    """The sweeper's part: requests of batches past their 24 hours expire, and batches
    whose requests have all finished are ended if that was missed."""
    repository = BatchRepository(session)
    now = utcnow()
    for batch_id in repository.expired(now, limit):
        expired = repository.end_runnable(
            batch_id,
            {
                "status": JobStatus.CANCELED,
                "finished_at": now,
                "updated_at": now,
                "next_attempt_at": None,
                "error_type": EXPIRED_ERROR,
                "error_message": "the batch expired (24 hours) before this request ran",
            },
        )
        repository.count_ended(batch_id, {"expired": len(expired)})
        _rollup(session, expired, now)
        end_if_finished(session, settings, batch_id)
    for batch_id in repository.finished_but_open(limit):
        end_if_finished(session, settings, batch_id)


def result_lines(session_factory: Any, batch_id: str) -> Iterator[bytes]:
    """The results as JSONL, a page of rows at a time, each page in a short session of its
    own: a 100,000-line result never sits whole in memory, nor holds a connection while
    the client reads slowly."""
    after: str | None = None
    while True:
        with session_factory() as session:
            rows = BatchRepository(session).results_page(batch_id, after, RESULTS_PAGE)
        if not rows:
            return
        yield b"".join(result_line(row) for row in rows)
        after = rows[-1].id


def job_ids_to_publish(
    session: Session, batch_id: str, after_id: str | None, limit: int
) -> list[str]:
    return BatchRepository(session).job_ids_to_publish(batch_id, after_id, limit)
