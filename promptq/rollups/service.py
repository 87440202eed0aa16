"""Writing the hourly rollups, in the transaction that records the work.

Why in the recording transaction rather than by a beat task reading past a watermark: the
increment commits with the row it counts or not at all, so a crash between the two cannot
lose or double count anything, and the current hour is exact the moment a job ends. A
watermark over jobs would need an order in which rows become visible, and neither ids (made
at intake) nor finished_at (set before a commit that may land later than a newer one's)
give one: a job committed late behind the watermark would be skipped for good, and closing
the gap means re-reading a window of recent rows on every pass. The price here is one more
upsert per job end and per upstream call, on a row shared by one key's jobs of one model in
that hour (one of ROLLUP_SHARDS rows); it is written last in its transaction, so its lock
lasts until that commit.

Every path that ends a job calls job_ended or jobs_ended once, after its compare-and-set to
a final status won: promptq.jobs.end_effects.end_events (a recorded attempt, a budget refusal, a
worker lost for good), a job's cancel, a batch's cancel and expiry, and the requests of a
batch that were invalid from the start.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from promptq.models import (
    LATENCY_BUCKETS_MS,
    AttemptHourly,
    AttemptHourlyShard,
    Base,
    Job,
    UsageHourly,
    UsageHourlyShard,
    WebhookHourly,
    WebhookHourlyShard,
)
from promptq.rollups.repository import RollupRepository

TOKEN_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
COST_COLUMNS = ("cost_total", "cost_input", "cost_output", "cost_cache_write", "cost_cache_read")
# Each rollup's key; in its shards table, the key and the shard.
USAGE_KEYS = ("hour", "api_key_id", "model", "status", "priced")
ATTEMPT_KEYS = ("hour", "api_key_id", "model", "outcome", "status_code")
USAGE_SHARD_KEYS = (*USAGE_KEYS, "shard")
ATTEMPT_SHARD_KEYS = (*ATTEMPT_KEYS, "shard")

# The rows one hour's figures of a key and model are spread over while the hour is written
# (promptq.models.UsageHourlyShard and its kin). Each recording adds to one of its own
# picking, at random: recordings of one key and model by many workers then seldom wait on
# one row's lock, held by each to the end of its commit (one row an hour capped one key and
# model, and every webhook attempt of the deployment, at about one record per commit's
# flush: bench/rollup_rows.py). Each sweeper pass folds the hours that are over into one
# row each (promptq.rollups.folding).
ROLLUP_SHARDS = 8


def pick_shard() -> int:
    """The shard one call of usage_rows, attempt_rows or webhook_attempt_rows puts all its
    rows in: so the rows of one table a recording locks are still locked in key order."""
    return random.randrange(ROLLUP_SHARDS)


ATTEMPT_COUNTS = (
    "attempts",
    "latency_ms_sum",
    *(f"le_{index}" for index in range(len(LATENCY_BUCKETS_MS))),
)


def floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class EndedJob:
    """What a job's end adds to its hour."""

    api_key_id: str
    model: str
    status: str
    finished_at: datetime
    tokens: tuple[int, int, int, int] = (0, 0, 0, 0)
    # None: no cost was recorded (a failure, a cancel, a model without a price).
    costs: tuple[Decimal, Decimal, Decimal, Decimal, Decimal] | None = None

    @classmethod
    def of(cls, job: Job) -> EndedJob:
        assert job.finished_at is not None, f"job {job.id} has not ended"
        return cls.of_columns(job, job.finished_at)

    @classmethod
    def of_columns(cls, job: Any, finished_at: datetime) -> EndedJob:
        """From a Job, or from a Row of the same columns (the backfill reads rows, not
        jobs)."""
        costs = None
        if job.cost_total is not None:
            costs = (
                job.cost_total,
                job.cost_input or Decimal(0),
                job.cost_output or Decimal(0),
                job.cost_cache_write or Decimal(0),
                job.cost_cache_read or Decimal(0),
            )
        return cls(
            api_key_id=job.api_key_id,
            model=job.model,
            status=job.status,
            finished_at=finished_at,
            tokens=(
                job.input_tokens or 0,
                job.output_tokens or 0,
                job.cache_creation_input_tokens or 0,
                job.cache_read_input_tokens or 0,
            ),
            costs=costs,
        )


def job_ended(session: Session, job: Job) -> None:
    jobs_ended(session, [EndedJob.of(job)])


def jobs_ended(session: Session, ended: Iterable[EndedJob]) -> None:
    """Add ended jobs to their hours' rows: one upsert per (hour, key, model, status,
    priced), however many jobs share it (a batch's cancel ends thousands at once). Rows
    are written in key order, so two transactions never take the same rows' locks in
    opposite orders."""
    RollupRepository(session).add_many(
        UsageHourlyShard, USAGE_SHARD_KEYS, USAGE_COUNTS, usage_rows(ended)
    )


USAGE_COUNTS = ("jobs", *TOKEN_COLUMNS, *COST_COLUMNS)


def usage_rows(ended: Iterable[EndedJob]) -> list[dict[str, object]]:
    """The usage_hourly increments of ended jobs, one per row they add to, in key order,
    all in one shard."""
    shard = pick_shard()
    groups: dict[tuple[datetime, str, str, str, bool], list[EndedJob]] = defaultdict(list)
    for job in ended:
        hour = floor_hour(job.finished_at)
        groups[(hour, job.api_key_id, job.model, job.status, job.costs is not None)].append(job)
    rows = []
    for (hour, api_key_id, model, status, priced), jobs in sorted(groups.items()):
        row: dict[str, object] = {
            "hour": hour,
            "api_key_id": api_key_id,
            "model": model,
            "status": status,
            "priced": priced,
            "shard": shard,
            "jobs": len(jobs),
        }
        for index, column in enumerate(TOKEN_COLUMNS):
            row[column] = sum(job.tokens[index] for job in jobs)
        for index, column in enumerate(COST_COLUMNS):
            row[column] = sum(
                (job.costs[index] for job in jobs if job.costs is not None), Decimal(0)
            )
        rows.append(row)
    return rows


@dataclass(frozen=True)
class RecordedAttempt:
    """What one upstream call adds to its hour."""

    api_key_id: str
    model: str
    finished_at: datetime
    outcome: str
    status_code: int | None
    latency_ms: int


def attempts_recorded(session: Session, recorded: Iterable[RecordedAttempt]) -> None:
    """Add upstream calls to their hours' rows, one upsert per row, in key order."""
    RollupRepository(session).add_many(
        AttemptHourlyShard, ATTEMPT_SHARD_KEYS, ATTEMPT_COUNTS, attempt_rows(recorded)
    )


def attempt_rows(recorded: Iterable[RecordedAttempt]) -> list[dict[str, object]]:
    """The attempt_hourly increments of upstream calls, one per row, in key order, all in
    one shard."""
    shard = pick_shard()
    groups: dict[tuple[datetime, str, str, str, str], list[RecordedAttempt]] = defaultdict(list)
    for attempt in recorded:
        code = str(attempt.status_code) if attempt.status_code is not None else "none"
        key = (floor_hour(attempt.finished_at), attempt.api_key_id, attempt.model, attempt.outcome)
        groups[(*key, code)].append(attempt)
    rows = []
    for (hour, api_key_id, model, outcome, code), attempts in sorted(groups.items()):
        row: dict[str, object] = {
            "hour": hour,
            "api_key_id": api_key_id,
            "model": model,
            "outcome": outcome,
            "status_code": code,
            "shard": shard,
            "attempts": len(attempts),
            "latency_ms_sum": sum(a.latency_ms for a in attempts),
        }
        for index, bound in enumerate(LATENCY_BUCKETS_MS):
            row[f"le_{index}"] = sum(1 for a in attempts if a.latency_ms <= bound)
        rows.append(row)
    return rows


WEBHOOK_KEYS = ("hour", "kind", "name")
WEBHOOK_SHARD_KEYS = (*WEBHOOK_KEYS, "shard")
WEBHOOK_COUNTS = ("count",)


def webhook_attempt_recorded(session: Session, rows: Sequence[dict[str, object]]) -> None:
    """Add one webhook attempt's rows (webhook_attempt_rows)."""
    # One statement for both: every delivery's record takes these rows' locks, held until
    # its commit, so one round trip fewer while holding the first shortens the wait of all.
    RollupRepository(session).add_many(WebhookHourlyShard, WEBHOOK_SHARD_KEYS, WEBHOOK_COUNTS, rows)


def webhook_attempt_rows(
    at: datetime, outcome: str, settled_as: str | None
) -> list[dict[str, object]]:
    """webhook_attempt_recorded's rows, always in this order (attempt, then delivery), so
    that their locks are never taken in opposite orders."""
    hour = floor_hour(at)
    shard = pick_shard()
    rows: list[dict[str, object]] = [
        {"hour": hour, "kind": "attempt", "name": outcome, "shard": shard, "count": 1}
    ]
    if settled_as is not None:
        rows.append(
            {"hour": hour, "kind": "delivery", "name": settled_as, "shard": shard, "count": 1}
        )
    return rows


@dataclass(frozen=True)
class Rollup:
    """One rollup: its table (the hours over, one row each), its shards table (the hours
    being written), the table's key, and the figures added up."""

    table: type[Base]
    shards: type[Base]
    keys: tuple[str, ...]
    counts: tuple[str, ...]


# What folding moves and what readers read as one (promptq.rollups.folding, .reading).
ROLLUPS = (
    Rollup(UsageHourly, UsageHourlyShard, USAGE_KEYS, USAGE_COUNTS),
    Rollup(AttemptHourly, AttemptHourlyShard, ATTEMPT_KEYS, ATTEMPT_COUNTS),
    Rollup(WebhookHourly, WebhookHourlyShard, WEBHOOK_KEYS, WEBHOOK_COUNTS),
)
