"""Hourly rollups: what jobs, upstream calls and webhook attempts came to, per hour, written
as the work is recorded, so that reports and /metrics add up hours instead of rows."""

from promptq.rollups.repository import follows, upsert_after
from promptq.rollups.service import (
    ATTEMPT_COUNTS,
    ATTEMPT_KEYS,
    COST_COLUMNS,
    ROLLUP_SHARDS,
    TOKEN_COLUMNS,
    USAGE_COUNTS,
    USAGE_KEYS,
    WEBHOOK_COUNTS,
    WEBHOOK_KEYS,
    EndedJob,
    RecordedAttempt,
    attempt_rows,
    attempts_recorded,
    floor_hour,
    job_ended,
    jobs_ended,
    usage_rows,
    webhook_attempt_recorded,
    webhook_attempt_rows,
)

__all__ = [
    "ATTEMPT_COUNTS",
    "ATTEMPT_KEYS",
    "COST_COLUMNS",
    "ROLLUP_SHARDS",
    "TOKEN_COLUMNS",
    "USAGE_COUNTS",
    "USAGE_KEYS",
    "WEBHOOK_COUNTS",
    "WEBHOOK_KEYS",
    "EndedJob",
    "RecordedAttempt",
    "attempt_rows",
    "attempts_recorded",
    "floor_hour",
    "follows",
    "job_ended",
    "jobs_ended",
    "upsert_after",
    "usage_rows",
    "webhook_attempt_recorded",
    "webhook_attempt_rows",
]
