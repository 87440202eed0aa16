"""All queries of retention: pages of old finished rows in id order, and their deletion."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, delete, func, select
from sqlalchemy.orm import Session

from promptq.models import (
    FINAL_STATUSES,
    Attempt,
    BatchStatus,
    BudgetReservation,
    Job,
    MessageBatch,
    WebhookAttempt,
    WebhookDelivery,
    has_status,
)

FINISHED_DELIVERY = ("succeeded", "failed")


class RetentionRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def _old_jobs(self, cutoff: datetime, below_id: str, batch_id: str | None) -> Select[Any]:
        """Jobs that ended before `cutoff`. `below_id`: the smallest id made at `cutoff` (ids
        are ULIDs, in creation order, and a job cannot end before it was made), which
        bounds the walk to the part of the primary key older than the cutoff."""
        query = select(Job.id).where(
            Job.id < below_id,
            has_status(*FINAL_STATUSES),
            Job.finished_at < cutoff,
            # Only once its end is in the ledger and the rollups (a job of the previous
            # release waits for the backfill): money never leaves with the job.
            Job.accounted == 1,
        )
        if batch_id is None:
            # A batch's requests go with their batch, so its results stay readable as long
            # as it is kept.
            return query.where(Job.batch_id.is_(None))
        return query.where(Job.batch_id == batch_id)

    def old_job_ids(
        self,
        cutoff: datetime,
        below_id: str,
        after_id: str | None,
        limit: int,
        batch_id: str | None = None,
    ) -> list[str]:
        query = self._old_jobs(cutoff, below_id, batch_id)
        if after_id is not None:
            query = query.where(Job.id > after_id)
        return list(self.session.scalars(query.order_by(Job.id).limit(limit)))

    def count_old_jobs(self, cutoff: datetime, below_id: str) -> int:
        subquery = self._old_jobs(cutoff, below_id, None).subquery()
        return int(self.session.scalar(select(func.count()).select_from(subquery)) or 0)

    def children(self, job_ids: Sequence[str]) -> tuple[int, int]:
        """(attempts, deliveries) of these jobs."""
        attempts = select(func.count()).where(Attempt.job_id.in_(job_ids))
        deliveries = select(func.count()).where(WebhookDelivery.job_id.in_(job_ids))
        return int(self.session.scalar(attempts) or 0), int(self.session.scalar(deliveries) or 0)

    def delete_jobs(self, job_ids: Sequence[str], cutoff: datetime) -> tuple[int, int, int]:
        """Delete these jobs and what hangs from them; (jobs, attempts, deliveries). Each
        statement checks again that the job has ended before the cutoff, so a page read a
        moment ago can never take an unfinished job with it (an ended job never starts
        again)."""
        still_old = select(Job.id).where(
            Job.id.in_(job_ids),
            has_status(*FINAL_STATUSES),
            Job.finished_at < cutoff,
            Job.accounted == 1,
        )
        deliveries = select(WebhookDelivery.id).where(WebhookDelivery.job_id.in_(still_old))
        self._delete(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(deliveries)))
        delivered = self._delete(
            delete(WebhookDelivery).where(WebhookDelivery.job_id.in_(still_old))
        )
        attempts = self._delete(delete(Attempt).where(Attempt.job_id.in_(still_old)))
        self._delete(delete(BudgetReservation).where(BudgetReservation.job_id.in_(still_old)))
        jobs = self._delete(
            delete(Job).where(
                Job.id.in_(job_ids),
                has_status(*FINAL_STATUSES),
                Job.finished_at < cutoff,
                Job.accounted == 1,
            )
        )
        return jobs, attempts, delivered

    def old_batch_ids(
        self, cutoff: datetime, below_id: str, after_id: str | None, limit: int
    ) -> list[str]:
        """Batches that ended before the cutoff."""
        query = select(MessageBatch.id).where(
            MessageBatch.id < below_id,
            MessageBatch.processing_status == BatchStatus.ENDED,
            MessageBatch.ended_at < cutoff,
        )
        if after_id is not None:
            query = query.where(MessageBatch.id > after_id)
        return list(self.session.scalars(query.order_by(MessageBatch.id).limit(limit)))

    def delete_batch_if_empty(self, batch_id: str) -> int:
        has_jobs = select(Job.id).where(Job.batch_id == batch_id).limit(1)
        if self.session.scalar(has_jobs) is not None:
            return 0
        return self._delete(delete(MessageBatch).where(MessageBatch.id == batch_id))

    def old_event_delivery_ids(
        self, cutoff: datetime, below_id: str, after_id: str | None, limit: int
    ) -> list[str]:
        """Settled deliveries of no job (batch.ended events) older than the cutoff."""
        query = select(WebhookDelivery.id).where(
            WebhookDelivery.id < below_id,
            WebhookDelivery.job_id.is_(None),
            WebhookDelivery.status.in_(FINISHED_DELIVERY),
            WebhookDelivery.finished_at < cutoff,
        )
        if after_id is not None:
            query = query.where(WebhookDelivery.id > after_id)
        return list(self.session.scalars(query.order_by(WebhookDelivery.id).limit(limit)))

    def delete_deliveries(self, delivery_ids: Sequence[str]) -> int:
        self._delete(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(delivery_ids)))
        return self._delete(
            delete(WebhookDelivery).where(
                WebhookDelivery.id.in_(delivery_ids),
                WebhookDelivery.status.in_(FINISHED_DELIVERY),
            )
        )

    def _delete(self, statement: object) -> int:
        result = self.session.execute(
            statement.execution_options(synchronize_session=False)  # type: ignore[attr-defined]
        )
        return int(result.rowcount)  # type: ignore[attr-defined]
