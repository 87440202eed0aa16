"""Errors the job service raises; the API maps each to a status code."""

from __future__ import annotations


class JobError(Exception):
    """Base: the message says what was wrong and what to do."""

    error_type = "invalid_request_error"


class JobNotFound(JobError):
    error_type = "not_found_error"


class JobConflict(JobError):
    """The request contradicts the job's state or an earlier request (cancel too late,
    an idempotency key reused with another body)."""

    error_type = "conflict_error"


class InvalidJob(JobError):
    error_type = "invalid_request_error"
