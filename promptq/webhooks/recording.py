"""A webhook attempt recorded in one statement on PostgreSQL: the attempt's row, its
delivery's next state, its job's webhook status and the hour's webhook figures, as the
data-modifying CTEs of one statement, run in autocommit (promptq.webhooks.deliveries.record
writes the same rows one statement each in a transaction on SQLite).

Why one statement: every delivery's record adds to the same rows of webhook_hourly, whose
locks last until the commit. In a transaction of several round trips they were held across
the last of them and the COMMIT, and a worker busy with a burst of jobs (a greenlet waits
its turn for the CPU between each round trip) made every other record wait on them: 200
deliveries went out at about 50 a second, half a second after their jobs ended
(bench/webhook_delay.py). Run alone, the statement holds them only while it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import CTE, Select, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from promptq.models import Job, WebhookAttempt, WebhookDelivery, WebhookHourlyShard
from promptq.rollups import WEBHOOK_COUNTS, WEBHOOK_SHARD_KEYS, follows, upsert_after

HOURLY_COLUMNS = (*WEBHOOK_SHARD_KEYS, *WEBHOOK_COUNTS)


@dataclass(frozen=True)
class AttemptRecord:
    """What one webhook attempt writes."""

    delivery_id: str
    attempt: dict[str, Any]  # the webhook_attempts row
    delivery: dict[str, Any]  # the delivery's columns to set
    job_id: str | None  # the job whose own delivery it is (its webhook status follows)
    job: dict[str, Any]
    # webhook_hourly rows to add, in the house order (promptq.rollups.webhook_attempt_rows)
    hourly: Sequence[dict[str, object]]


@dataclass(frozen=True)
class Shape:
    attempt: tuple[str, ...]
    delivery: tuple[str, ...]
    job: tuple[str, ...] | None
    hourly: int


def record_in_one(session: Session, record: AttemptRecord) -> None:
    """Write the attempt's record, on the session's connection (autocommit: see module)."""
    statement = _statement(
        Shape(
            attempt=tuple(record.attempt),
            delivery=tuple(record.delivery),
            job=tuple(record.job) if record.job_id is not None else None,
            hourly=len(record.hourly),
        )
    )
    # Not "delivery_id" nor "job_id": in an UPDATE, SQLAlchemy takes a parameter named as a
    # column of its table for that column's new value.
    params: dict[str, Any] = {"the_delivery": record.delivery_id, "the_job": record.job_id}
    for prefix, row in (("a_", record.attempt), ("d_", record.delivery), ("j_", record.job)):
        params.update({f"{prefix}{name}": value for name, value in row.items()})
    for index, row in enumerate(record.hourly):
        params.update({f"h{index}_{name}": row[name] for name in HOURLY_COLUMNS})
    session.connection().execute(statement, params)


@lru_cache(maxsize=32)
def _statement(shape: Shape) -> Select[Any]:
    """The statement of one shape (sent, retried or failed; a job's own delivery or a
    subscription's), built and compiled once."""
    parts: list[CTE] = [
        insert(WebhookAttempt)
        .values({name: _bound("a_", WebhookAttempt, name) for name in shape.attempt})
        .cte("attempt"),
        update(WebhookDelivery)
        .where(WebhookDelivery.id == bindparam("the_delivery"))
        .values({name: _bound("d_", WebhookDelivery, name) for name in shape.delivery})
        .cte("delivery"),
    ]
    if shape.job is not None:
        parts.append(
            update(Job)
            .where(Job.id == bindparam("the_job"))
            .values({name: _bound("j_", Job, name) for name in shape.job})
            .cte("job")
        )
    # The shared rows one after the other, always in the same order (attempt, then delivery:
    # see promptq.rollups.webhook_attempt_rows).
    after = None
    for index in range(shape.hourly):
        hourly = upsert_after(
            WebhookHourlyShard,
            WEBHOOK_SHARD_KEYS,
            WEBHOOK_COUNTS,
            HOURLY_COLUMNS,
            f"h{index}_",
            after=after,
        ).cte(f"hourly{index}")
        parts.append(hourly)
        after = follows(hourly)
    return select(func.count()).select_from(parts[-1]).add_cte(*parts)


def _bound(prefix: str, model: Any, name: str) -> Any:
    return bindparam(f"{prefix}{name}", type_=model.__table__.c[name].type)
