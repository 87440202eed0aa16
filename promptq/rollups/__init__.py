"""Hourly rollups: what jobs, upstream calls and webhook attempts came to, per hour, written
as the work is recorded, so that reports and /metrics add up hours instead of rows."""

from promptq.rollups.service import (
    EndedJob,
    RecordedAttempt,
    attempt_recorded,
    attempts_recorded,
    floor_hour,
    job_ended,
    jobs_ended,
    webhook_attempt_recorded,
)

__all__ = [
    "EndedJob",
    "RecordedAttempt",
    "attempt_recorded",
    "attempts_recorded",
    "floor_hour",
    "job_ended",
    "jobs_ended",
    "webhook_attempt_recorded",
]
