"""The client-facing job lifecycle: create, read, list, cancel. Services flush, never commit."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session

from promptq.budgets import check_budget
from promptq.config import Settings
from promptq.ids import new_id
from promptq.jobs.errors import InvalidJob, JobConflict, JobNotFound
from promptq.jobs.repository import JobRepository
from promptq.jobs.schemas import JobCreate
from promptq.models import RUNNABLE_STATUSES, ApiKey, Job, JobStatus
from promptq.types import utcnow
from promptq.webhooks import UnsafeTarget, check_url

IDEMPOTENCY_WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class CreatedJob:
    job: Job
    # False when an idempotency key returned an earlier job instead of a new one.
    created: bool


def request_fingerprint(payload: JobCreate) -> str:
    """A stable hash of what was asked, to tell a retried request from a different one."""
    body = payload.model_dump(mode="json", exclude={"idempotency_key"}, exclude_none=True)
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def resolve_idempotency_key(payload: JobCreate, header: str | None) -> str | None:
    if header is not None and payload.idempotency_key not in (None, header):
        raise InvalidJob(
            "the Idempotency-Key header and the idempotency_key field differ; send one"
        )
    key = header if header is not None else payload.idempotency_key
    if key is not None and not 1 <= len(key) <= 255:
        raise InvalidJob("Idempotency-Key must be 1 to 255 characters")
    return key


def find_idempotent_job(
    session: Session, key: ApiKey, idempotency_key: str, fingerprint: str
) -> Job | None:
    """The earlier job for this key within the window, or None. A reuse with another body
    is a conflict; a key older than the window is released for reuse."""
    repository = JobRepository(session)
    existing = repository.by_idempotency_key(key.id, idempotency_key)
    if existing is None:
        return None
    if existing.created_at < utcnow() - IDEMPOTENCY_WINDOW:
        existing.idempotency_key = None
        session.flush()
        return None
    if existing.request_hash != fingerprint:
        raise JobConflict(
            f"Idempotency-Key {idempotency_key!r} was already used with a different request "
            f"(job {existing.id}); use a new key for a new request"
        )
    return existing


def create_job(
    session: Session,
    settings: Settings,
    key: ApiKey,
    payload: JobCreate,
    idempotency_header: str | None = None,
    anthropic_beta: str | None = None,
) -> CreatedJob:
    idempotency_key = resolve_idempotency_key(payload, idempotency_header)
    fingerprint = request_fingerprint(payload)
    if idempotency_key is not None:
        earlier = find_idempotent_job(session, key, idempotency_key, fingerprint)
        if earlier is not None:
            return CreatedJob(job=earlier, created=False)

    check_budget(session, key)
    if payload.target_url is not None:
        try:
            check_url(
                payload.target_url,
                allow_private=settings.webhook_allow_private,
                allow=settings.webhook_allow_list,
            )
        except UnsafeTarget as exc:
            raise InvalidJob(str(exc)) from None
    params = payload.messages_request(settings.default_model, settings.default_max_tokens)
    job = Job(
        id=new_id("job"),
        api_key_id=key.id,
        status=JobStatus.QUEUED,
        model=params.model,
        priority=payload.priority,
        request=params.to_upstream(),
        metadata_=payload.metadata,
        webhook_url=payload.target_url,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
        attempts=0,
        max_attempts=settings.max_attempts,
        anthropic_beta=anthropic_beta,
    )
    JobRepository(session).add(job)
    return CreatedJob(job=job, created=True)


def get_job(session: Session, key: ApiKey, job_id: str) -> Job:
    job = JobRepository(session).get_for_key(job_id, key.id)
    if job is None:
        # Another key's job is "not found" too: its existence is not ours to reveal.
        raise JobNotFound(f"no job {job_id!r} for this API key")
    return job


def list_jobs(
    session: Session,
    key: ApiKey,
    status: str | None,
    limit: int,
    after: str | None,
    batch: str | None = None,
) -> tuple[Sequence[Job], bool]:
    """A page of jobs, newest first, and whether more follow. `after` is the cursor: the
    last id of the previous page. `batch`: a batch's id for its requests only, `none` to
    leave batch requests out (a polling trigger wants one event per job it started)."""
    if status is not None and status not in {s.value for s in JobStatus}:
        allowed = ", ".join(s.value for s in JobStatus)
        raise InvalidJob(f"status: must be one of {allowed}")
    rows = JobRepository(session).list_for_key(key.id, status, limit + 1, after, batch)
    return rows[:limit], len(rows) > limit


def cancel_job(session: Session, key: ApiKey, job_id: str) -> Job:
    """A batch whose last open request this was is ended by the sweeper's next round."""
    job = get_job(session, key, job_id)
    now = utcnow()
    canceled = JobRepository(session).transition(
        job.id,
        RUNNABLE_STATUSES,
        {
            "status": JobStatus.CANCELED,
            "finished_at": now,
            "updated_at": now,
            "next_attempt_at": None,
        },
    )
    session.refresh(job)
    if not canceled:
        if job.status == JobStatus.RUNNING:
            raise JobConflict(
                f"job {job.id} is already running at the upstream and can no longer be canceled"
            )
        if job.status != JobStatus.CANCELED:
            raise JobConflict(f"job {job.id} has already {job.status}; nothing to cancel")
    return job
