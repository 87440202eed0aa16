"""What the /dashboard page shows: jobs by status, the latest failures, and spend per day and
per model. The spend comes from the usage report, so the page and `GET /v1/usage` agree to
the picodollar. Everything is scoped to one key, or to every key when `api_key_id` is None.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from ulid import ULID

from promptq.clock import utcnow
from promptq.metrics import LimiterState
from promptq.models import ApiKey, Job, JobStatus, UsageHourly, has_status, is_active_job
from promptq.periods import Period, current_month, isoformat_z
from promptq.reports.repository import FinishedJob, recent_finished
from promptq.reports.service import UsageReport, UsageRow, cost_parts, usage_report
from promptq.rollups.reading import rollup_rows

SPEND_DAYS = 30
FAILURES_SHOWN = 20
HOURS = 24
# A job finished within the last day was created at most this long before (a batch request
# expires 24 hours after its batch was made): the id range that bounds the rows read.
CREATED_LOOKBACK = timedelta(hours=48)
# The hourly figures come from at most this many of the latest jobs: a page render must not
# read a day of a busy deployment whole.
MAX_HOURLY_JOBS = 50_000


@dataclass(frozen=True)
class Failure:
    id: str
    model: str
    key_name: str
    finished_at: datetime | None
    error_type: str | None
    error_message: str | None
    upstream_status: int | None


def status_counts(session: Session, api_key_id: str | None) -> dict[str, int]:
    """Every status, in lifecycle order, with its count of jobs (zero included): the jobs
    in flight counted through the partial index of active jobs, the ended ones added up
    from the hourly rollups (so they stay counted after retention deletes the jobs)."""
    active = select(Job.status, func.count()).where(is_active_job()).group_by(Job.status)
    usage = rollup_rows(UsageHourly)
    ended = select(usage.c.status, func.sum(usage.c.jobs)).group_by(usage.c.status)
    if api_key_id is not None:
        active = active.where(Job.api_key_id == api_key_id)
        ended = ended.where(usage.c.api_key_id == api_key_id)
    counts = {status.value: 0 for status in JobStatus}
    for query in (active, ended):
        for status, count in session.execute(query):
            counts[status] += int(count or 0)
    return counts


def recent_failures(
    session: Session, api_key_id: str | None, limit: int = FAILURES_SHOWN
) -> list[Failure]:
    """The latest failed jobs, most recently finished first."""
    query = (
        select(
            Job.id,
            Job.model,
            ApiKey.name,
            Job.finished_at,
            Job.error_type,
            Job.error_message,
            Job.upstream_status,
        )
        .join(ApiKey, ApiKey.id == Job.api_key_id)
        .where(has_status(JobStatus.FAILED), Job.finished_at.is_not(None))
        .order_by(Job.finished_at.desc(), Job.id.desc())
        .limit(limit)
    )
    if api_key_id is not None:
        query = query.where(Job.api_key_id == api_key_id)
    return [Failure(*row) for row in session.execute(query)]


def last_days(now: datetime, days: int = SPEND_DAYS) -> Period:
    """The `days` UTC calendar days up to and including today."""
    now = now.astimezone(UTC)
    today = datetime(now.year, now.month, now.day, tzinfo=UTC)
    return Period(today - timedelta(days=days - 1), today + timedelta(days=1))


@dataclass(frozen=True)
class Hour:
    """One hour of the last day: the jobs that finished in it, and how long they took from
    submission to result (seconds; None without a finished job)."""

    start: datetime
    succeeded: int
    failed: int  # failed or canceled
    p50_seconds: float | None
    p95_seconds: float | None

    def to_api(self) -> dict[str, Any]:
        return {
            "hour": isoformat_z(self.start),
            "succeeded": self.succeeded,
            "failed": self.failed,
            "p50_seconds": self.p50_seconds,
            "p95_seconds": self.p95_seconds,
        }


def last_hours(jobs: Iterable[FinishedJob], now: datetime, hours: int = HOURS) -> list[Hour]:
    """`hours` whole UTC hours up to and including the current one, empty ones included."""
    now = now.astimezone(UTC)
    first = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)
    buckets: list[list[FinishedJob]] = [[] for _ in range(hours)]
    for job in jobs:
        index = math.floor((_utc(job.finished_at) - first).total_seconds() / 3600)
        if 0 <= index < hours:
            buckets[index].append(job)
    result = []
    for index, bucket in enumerate(buckets):
        took = sorted((_utc(j.finished_at) - _utc(j.created_at)).total_seconds() for j in bucket)
        succeeded = sum(job.status == JobStatus.SUCCEEDED for job in bucket)
        result.append(
            Hour(
                first + timedelta(hours=index),
                succeeded,
                len(bucket) - succeeded,
                _percentile(took, 0.50),
                _percentile(took, 0.95),
            )
        )
    return result


def _utc(moment: datetime) -> datetime:
    # SQLite gives naive datetimes back; promptq stores UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _percentile(ordered: list[float], share: float) -> float | None:
    """Nearest rank: a duration some job really took, never an interpolated one."""
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(share * len(ordered)) - 1)], 3)


def first_id_since(moment: datetime, prefix: str = "job") -> str:
    """The smallest id a job created at `moment` or later can have: a ULID is its creation
    time in milliseconds, then randomness."""
    millis = int(moment.timestamp() * 1000)
    return f"{prefix}_{ULID.from_bytes(millis.to_bytes(6, 'big') + bytes(10))}"


@dataclass(frozen=True)
class Dashboard:
    rendered_at: datetime
    api_key_id: str | None
    statuses: dict[str, int]
    by_day: UsageReport
    by_model: UsageReport
    failures: list[Failure]
    hours: list[Hour]
    # The rate limiter's state per model, None when Redis did not answer.
    limiter: list[LimiterState] | None

    def spend_by_day(self) -> list[dict[str, Any]]:
        """One entry per day of the period, days without spend as zero, so a chart of it
        shows the gaps; amounts stay decimal strings (the browser converts them to draw)."""
        rows = {row.sums.group[0]: row for row in self.by_day.rows}
        start, end = self.by_day.period.start, self.by_day.period.end
        entries = []
        for offset in range((end - start).days):
            day = (start + timedelta(days=offset)).date().isoformat()
            row = rows.get(day)
            entries.append(
                {"day": day, "jobs": row.sums.jobs if row else 0, "cost": cost_total(row)}
            )
        return entries

    def chart_data(self) -> dict[str, Any]:
        """What the page's script draws, embedded in the page as JSON."""
        return {
            "rendered_at": isoformat_z(self.rendered_at),
            "scope": "all keys" if self.api_key_id is None else self.api_key_id,
            "statuses": [
                {"status": status, "jobs": count} for status, count in self.statuses.items()
            ],
            "spend_by_day": {
                "from": isoformat_z(self.by_day.period.start),
                "to": isoformat_z(self.by_day.period.end),
                "days": self.spend_by_day(),
                **_totals(self.by_day),
            },
            "hours": [hour.to_api() for hour in self.hours],
            "limiter": None
            if self.limiter is None
            else [
                {
                    "model": state.model,
                    "in_flight": state.in_flight,
                    "waiting": state.waiting,
                    "paused_seconds": round(state.paused_seconds, 1),
                }
                for state in self.limiter
            ],
            "spend_by_model": {
                "from": isoformat_z(self.by_model.period.start),
                "to": isoformat_z(self.by_model.period.end),
                "models": [
                    {"model": row.sums.group[0], "jobs": row.sums.jobs, "cost": cost_total(row)}
                    for row in self.by_model.rows
                ],
                **_totals(self.by_model),
            },
        }


def cost_total(row: UsageRow | None) -> str:
    return cost_parts(row.sums)["total"] if row else "0"


def _totals(report: UsageReport) -> dict[str, Any]:
    total = report.total
    return {"jobs": total.jobs, "cost": cost_parts(total)["total"]}


LimiterReader = Callable[[Iterable[str]], list[LimiterState] | None]


def build_dashboard(
    session: Session,
    api_key_id: str | None,
    now: datetime | None = None,
    limiter: LimiterReader | None = None,
) -> Dashboard:
    """`limiter` reads the rate limiter's state for some models (and those with jobs
    waiting); the limits are the account's, so every signed-in key sees them."""
    now = now or utcnow()
    recent = recent_finished(
        session,
        api_key_id,
        first_id_since(now - CREATED_LOOKBACK),
        now - timedelta(hours=HOURS),
        MAX_HOURLY_JOBS,
    )
    return Dashboard(
        rendered_at=now,
        api_key_id=api_key_id,
        statuses=status_counts(session, api_key_id),
        by_day=usage_report(session, "day", last_days(now), api_key_id),
        by_model=usage_report(session, "model", current_month(now), api_key_id),
        failures=recent_failures(session, api_key_id),
        hours=last_hours(recent, now),
        limiter=limiter(sorted({job.model for job in recent})) if limiter else None,
    )
