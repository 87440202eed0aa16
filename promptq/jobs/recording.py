"""An attempt recorded in one statement on PostgreSQL: the attempt's row, the job's
compare-and-set to its next status, its hour's usage, the call's hour and the key's spend,
as the data-modifying CTEs of one statement, so that the common job pays one round trip for
all of it (promptq.jobs.execution.record_attempt writes the same rows one statement each on
SQLite, which has no data-modifying CTE, and for a batch's request, whose batch row comes
between the job and its rollups).

What depends on the compare-and-set winning (the usage row, the spend) adds a row once for
each row the job's UPDATE returned, so none when another took the job back. The parts run in
the house order (job, usage, attempts, ledger: see record_attempt), each reading the one
before it: PostgreSQL runs a data-modifying CTE to its end when another part reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import CTE, ColumnElement, func, insert, select, update
from sqlalchemy.orm import Session

from promptq import budgets
from promptq.jobs.repository import subscribed_of_job
from promptq.models import Attempt, AttemptHourly, Job, UsageHourly
from promptq.rollups import (
    ATTEMPT_COUNTS,
    ATTEMPT_KEYS,
    USAGE_COUNTS,
    USAGE_KEYS,
    EndedJob,
    RecordedAttempt,
    attempt_rows,
    upsert_after,
    usage_rows,
)


@dataclass(frozen=True)
class Record:
    """What one attempt writes."""

    job_id: str
    api_key_id: str
    attempt: dict[str, Any]
    settle_from: Sequence[str]
    values: dict[str, Any]
    call: RecordedAttempt
    # The job's end, counted only if the compare-and-set wins (None: it does not end).
    ended: EndedJob | None
    # Its cost, booked in the key's spend ledger on the same condition.
    spend: Decimal | None
    finished_at: datetime


def record_in_one(session: Session, record: Record) -> tuple[bool, bool]:
    """(settled, subscribed): whether the job's compare-and-set won, and whether its key
    has a webhook subscription in force (see JobRepository.settle)."""
    attempt = insert(Attempt).values(**record.attempt).cte("attempt")
    settled = (
        update(Job)
        .where(Job.id == record.job_id, Job.status.in_(record.settle_from))
        .values(**record.values)
        .returning(Job.id, subscribed_of_job().label("subscribed"))
        .cte("settled")
    )
    parts: list[CTE] = [attempt, settled]
    if record.ended is not None:
        [row] = usage_rows([record.ended])
        parts.append(
            upsert_after(UsageHourly, USAGE_KEYS, USAGE_COUNTS, row, source=settled).cte("usage")
        )
    [row] = attempt_rows([record.call])
    after = _follows(parts[-1]) if record.ended is not None else None
    parts.append(
        upsert_after(AttemptHourly, ATTEMPT_KEYS, ATTEMPT_COUNTS, row, after=after).cte("calls")
    )
    if record.spend is not None:
        ledger = budgets.spend_after(
            record.api_key_id, record.finished_at, record.spend, settled, _follows(parts[-1])
        )
        parts.append(ledger.cte("ledger"))
    # Read in this order: the job's row first, then the last part, which reads the others.
    query = select(
        select(func.count()).select_from(settled).scalar_subquery(),
        select(settled.c.subscribed).scalar_subquery(),
        select(func.count()).select_from(parts[-1]).scalar_subquery(),
    ).add_cte(*parts)
    won, subscribed, _ = session.execute(query).one()
    return bool(won), bool(subscribed)


def _follows(part: CTE) -> ColumnElement[bool]:
    """A term true once `part` has run (it reads all of it)."""
    return select(func.count()).select_from(part).scalar_subquery() >= 0
