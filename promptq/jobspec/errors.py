"""Errors the job service raises, each on the branch of promptq.errors that answers it."""

from __future__ import annotations

from promptq.errors import Conflict, InvalidRequest, NotFound


class JobNotFound(NotFound):
    pass


class JobConflict(Conflict):
    """The request contradicts the job's state or an earlier request (cancel too late,
    an idempotency key reused with another body)."""


class InvalidJob(InvalidRequest):
    pass
