"""All queries on Message Batches and on the jobs that are their requests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from promptq.models import RUNNABLE_STATUSES, BatchStatus, Job, JobStatus, MessageBatch

# A batch request that expired before it ran is a canceled job with this error type.
EXPIRED_ERROR = "expired_error"
# How an ended request counts in Anthropic's request_counts, and the batch's column for it.
OUTCOME_COLUMNS = {
    "succeeded": "succeeded_count",
    "errored": "errored_count",
    "canceled": "canceled_count",
    "expired": "expired_count",
}
OPEN_BATCH_STATUSES = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELING)


def outcome_of(status: str, error_type: str | None) -> str:
    """The request_counts entry of a request that ended with this status."""
    if status == JobStatus.SUCCEEDED:
        return "succeeded"
    if status == JobStatus.FAILED:
        return "errored"
    if status == JobStatus.CANCELED:
        return "expired" if error_type == EXPIRED_ERROR else "canceled"
    raise ValueError(f"a request with status {status!r} has not ended")


RESULT_COLUMNS = (
    Job.id,
    Job.custom_id,
    Job.status,
    Job.result,
    Job.error_type,
    Job.error_message,
    Job.upstream_status,
)


class BatchRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, batch: MessageBatch, jobs: list[dict[str, Any]]) -> None:
        """The batch and its jobs in bulk: one multi-row INSERT per few hundred jobs rather
        than a round trip per job, which is what lets 10,000 requests land in well under a
        second."""
        self.session.add(batch)
        self.session.flush()
        if jobs:
            self.session.execute(insert(Job), jobs)

    def get_for_key(self, batch_id: str, api_key_id: str) -> MessageBatch | None:
        query = select(MessageBatch).where(
            MessageBatch.id == batch_id,
            MessageBatch.api_key_id == api_key_id,
            MessageBatch.deleted_at.is_(None),
        )
        return self.session.scalars(query).first()

    def lock(self, batch_id: str) -> MessageBatch | None:
        """The batch row, locked until commit (PostgreSQL): whoever ends a batch checks its
        unfinished requests under this lock, so two workers finishing its last two requests
        at once cannot both miss the end."""
        query = (
            select(MessageBatch)
            .where(MessageBatch.id == batch_id)
            .with_for_update()
            # The counters may have moved in this transaction by an UPDATE the loaded
            # object did not see.
            .execution_options(populate_existing=True)
        )
        return self.session.scalars(query).first()

    def page_for_key(
        self, api_key_id: str, limit: int, after_id: str | None, before_id: str | None
    ) -> Sequence[MessageBatch]:
        """Newest first, as Anthropic lists them: after_id pages to older batches, before_id
        to newer ones (returned newest first all the same)."""
        query = select(MessageBatch).where(
            MessageBatch.api_key_id == api_key_id, MessageBatch.deleted_at.is_(None)
        )
        if before_id is not None:
            rows = self.session.scalars(
                query.where(MessageBatch.id > before_id).order_by(MessageBatch.id).limit(limit)
            ).all()
            return list(reversed(rows))
        if after_id is not None:
            query = query.where(MessageBatch.id < after_id)
        return self.session.scalars(query.order_by(MessageBatch.id.desc()).limit(limit)).all()

    def count_ended(self, batch_id: str, outcomes: Mapping[str, int]) -> None:
        """Move ended requests from processing to their outcomes' counters. One UPDATE,
        relative to the row's current values, so workers ending requests of one batch at
        once each add theirs (the row lock orders them)."""
        ended = sum(outcomes.values())
        if ended == 0:
            return
        values: dict[str, Any] = {"processing_count": MessageBatch.processing_count - ended}
        for outcome, count in outcomes.items():
            column = OUTCOME_COLUMNS[outcome]
            values[column] = getattr(MessageBatch, column) + count
        self.session.execute(
            update(MessageBatch)
            .where(MessageBatch.id == batch_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )

    def job_ids_to_publish(self, batch_id: str, after_id: str | None, limit: int) -> list[str]:
        query = select(Job.id).where(Job.batch_id == batch_id, Job.status.in_(RUNNABLE_STATUSES))
        if after_id is not None:
            query = query.where(Job.id > after_id)
        return list(self.session.scalars(query.order_by(Job.id).limit(limit)))

    def unfinished_of_key(self, api_key_id: str) -> list[str]:
        query = select(MessageBatch.id).where(
            MessageBatch.api_key_id == api_key_id,
            MessageBatch.processing_status != BatchStatus.ENDED,
        )
        return list(self.session.scalars(query))

    def end_runnable(self, batch_id: str, values: dict[str, Any]) -> list[tuple[str, str]]:
        """Finish every request of the batch that has not started (cancel, expiry); the
        (api key id, model) of each request so ended, for the rollups."""
        statement = (
            update(Job)
            .where(Job.batch_id == batch_id, Job.status.in_(RUNNABLE_STATUSES))
            # The caller counts them, in this transaction.
            .values(**values, accounted=1)
            .returning(Job.api_key_id, Job.model)
            .execution_options(synchronize_session=False)
        )
        return [(row[0], row[1]) for row in self.session.execute(statement)]

    def results_page(self, batch_id: str, after_id: str | None, limit: int) -> Sequence[Any]:
        query = select(*RESULT_COLUMNS).where(Job.batch_id == batch_id)
        if after_id is not None:
            query = query.where(Job.id > after_id)
        return self.session.execute(query.order_by(Job.id).limit(limit)).all()

    def expired(self, now: datetime, limit: int) -> Sequence[str]:
        query = (
            select(MessageBatch.id)
            .where(
                MessageBatch.processing_status != BatchStatus.ENDED,
                MessageBatch.expires_at <= now,
            )
            .limit(limit)
        )
        return self.session.scalars(query).all()

    def finished_but_open(self, limit: int) -> Sequence[str]:
        """Batches not marked ended whose requests have all ended: the safety net for an
        end that was missed (a process killed at the wrong moment, a request canceled on
        its own)."""
        query = (
            select(MessageBatch.id)
            .where(
                MessageBatch.processing_status.in_(OPEN_BATCH_STATUSES),
                MessageBatch.processing_count <= 0,
            )
            .limit(limit)
        )
        return self.session.scalars(query).all()
