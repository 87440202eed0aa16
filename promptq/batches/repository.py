"""All queries on Message Batches and on the jobs that are their requests."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import exists, func, insert, select, update
from sqlalchemy.orm import Session

from promptq.models import FINAL_STATUSES, RUNNABLE_STATUSES, BatchStatus, Job, MessageBatch

# A batch request that expired before it ran is a canceled job with this error type.
EXPIRED_ERROR = "expired_error"
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
        query = select(MessageBatch).where(MessageBatch.id == batch_id).with_for_update()
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

    def status_counts(self, batch_ids: Iterable[str]) -> dict[str, dict[tuple[str, bool], int]]:
        """Per batch: (job status, expired?) -> number of its requests."""
        ids = list(batch_ids)
        counts: dict[str, dict[tuple[str, bool], int]] = defaultdict(dict)
        if not ids:
            return counts
        expired = Job.error_type == EXPIRED_ERROR
        query = (
            select(Job.batch_id, Job.status, expired, func.count())
            .where(Job.batch_id.in_(ids))
            .group_by(Job.batch_id, Job.status, expired)
        )
        for batch_id, status, is_expired, count in self.session.execute(query):
            counts[str(batch_id)][(status, bool(is_expired))] = count
        return counts

    def has_unfinished(self, batch_id: str) -> bool:
        query = select(
            exists().where(Job.batch_id == batch_id, Job.status.not_in(list(FINAL_STATUSES)))
        )
        return bool(self.session.scalar(query))

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

    def end_runnable(self, batch_id: str, values: dict[str, Any]) -> int:
        """Finish every request of the batch that has not started (cancel, expiry)."""
        statement = (
            update(Job)
            .where(Job.batch_id == batch_id, Job.status.in_(RUNNABLE_STATUSES))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return self.session.execute(statement).rowcount  # type: ignore[attr-defined]

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
        """Batches not marked ended whose requests have all finished: the safety net for an
        end that was missed (a process killed at the wrong moment)."""
        unfinished = exists().where(
            Job.batch_id == MessageBatch.id, Job.status.not_in(list(FINAL_STATUSES))
        )
        query = (
            select(MessageBatch.id)
            .where(MessageBatch.processing_status != BatchStatus.ENDED, ~unfinished)
            .limit(limit)
        )
        return self.session.scalars(query).all()
