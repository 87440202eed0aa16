"""All queries of the usage report: sums over the hourly rollups of the jobs with a recorded
cost, grouped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    String,
    func,
    literal_column,
    select,
    type_coerce,
)
from sqlalchemy.orm import Session

from promptq.models import ApiKey, Job, UsageHourly
from promptq.rollups.reading import rollup_rows

GroupBy = Literal["model", "key", "day"]
GROUP_BYS: tuple[GroupBy, ...] = ("model", "key", "day")


@dataclass(frozen=True)
class UsageSums:
    """One group's sums, as the database gave them: money in integer picodollars."""

    group: tuple[str, ...]  # (model,), (key id, key name) or (YYYY-MM-DD,)
    jobs: int
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost_total: int
    cost_input: int
    cost_output: int
    cost_cache_write: int
    cost_cache_read: int


def day_of(column: Any, dialect: str) -> ColumnElement[str]:
    """The UTC calendar day of a timestamp as YYYY-MM-DD text, in SQL, per dialect."""
    # The constants are literals, not bound parameters: PostgreSQL must see the expression
    # in GROUP BY as the same one as in the select list, and $1 and $2 are not.
    if dialect == "postgresql":
        # timezone('UTC', timestamptz) is the UTC wall-clock time, whatever the session's
        # TimeZone setting.
        utc = func.timezone(literal_column("'UTC'"), column)
        return func.to_char(utc, literal_column("'YYYY-MM-DD'"), type_=String)
    # SQLite keeps promptq's timestamps as naive UTC text (promptq.types.UTCDateTime).
    return func.strftime(literal_column("'%Y-%m-%d'"), column, type_=String)


def _sum(column: Any) -> ColumnElement[int]:
    # type_coerce: the raw integers (picodollars for money), not Money's conversion per
    # row; they become Decimal once, at the edge.
    return func.coalesce(func.sum(type_coerce(column, BigInteger)), 0)


class UsageRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def sums(
        self, group_by: GroupBy, start: datetime, end: datetime, api_key_id: str | None
    ) -> list[UsageSums]:
        """Sums per group over the hourly rollups of jobs with a recorded cost, for the hours
        that start in [start, end): a report reads hours, never jobs, and keeps its figures
        after retention has deleted the jobs. The current hour's row is as exact as the
        others, being written in the transaction that records each cost."""
        keys: Sequence[Any]
        usage = rollup_rows(UsageHourly)
        if group_by == "model":
            keys = [usage.c.model]
        elif group_by == "key":
            keys = [usage.c.api_key_id, ApiKey.name]
        else:
            dialect = self.session.get_bind().dialect.name
            keys = [day_of(usage.c.hour, dialect).label("day")]
        query: Select[Any] = select(
            *keys,
            _sum(usage.c.jobs),
            _sum(usage.c.input_tokens),
            _sum(usage.c.output_tokens),
            _sum(usage.c.cache_creation_input_tokens),
            _sum(usage.c.cache_read_input_tokens),
            _sum(usage.c.cost_total),
            _sum(usage.c.cost_input),
            _sum(usage.c.cost_output),
            _sum(usage.c.cost_cache_write),
            _sum(usage.c.cost_cache_read),
        ).where(
            usage.c.priced.is_(True),
            usage.c.hour >= start,
            usage.c.hour < end,
        )
        if group_by == "key":
            query = query.join(ApiKey, ApiKey.id == usage.c.api_key_id)
        if api_key_id is not None:
            query = query.where(usage.c.api_key_id == api_key_id)
        query = query.group_by(*keys).order_by(*reversed(keys) if group_by == "key" else keys)
        width = len(keys)
        return [
            UsageSums(
                tuple(str(value) for value in row[:width]),
                *(int(value) for value in row[width:]),
            )
            for row in self.session.execute(query)
        ]


@dataclass(frozen=True)
class FinishedJob:
    model: str
    status: str
    created_at: datetime
    finished_at: datetime


def recent_finished(
    session: Session,
    api_key_id: str | None,
    created_from_id: str,
    finished_after: datetime,
    limit: int,
) -> list[FinishedJob]:
    """Jobs finished after `finished_after`, newest first, read through the id range from
    `created_from_id` (ids sort by creation time), so the rows read follow the recent work,
    not the whole history."""
    query = (
        select(Job.model, Job.status, Job.created_at, Job.finished_at)
        .where(Job.id >= created_from_id, Job.finished_at >= finished_after)
        .order_by(Job.id.desc())
        .limit(limit)
    )
    if api_key_id is not None:
        query = query.where(Job.api_key_id == api_key_id)
    return [
        FinishedJob(model, status, created_at, finished_at)
        for model, status, created_at, finished_at in session.execute(query)
        if finished_at is not None  # the WHERE clause already says so; mypy cannot see it
    ]
