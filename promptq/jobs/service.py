"""The client-facing job lifecycle: create, read, list, cancel. Services flush, never commit."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from promptq import outbox, quotas
from promptq.batches.service import count_ended
from promptq.budgets import check_budget, max_cost
from promptq.budgets.priceable import check_priceable
from promptq.clock import utcnow
from promptq.config import Settings
from promptq.ids import new_id
from promptq.jobs.repository import JobRepository
from promptq.jobspec.errors import InvalidJob, JobConflict, JobNotFound
from promptq.jobspec.schemas import JobCreate
from promptq.keys.policy import check_model
from promptq.models import RUNNABLE_STATUSES, ApiKey, Job, JobStatus
from promptq.pricing import settings_prices
from promptq.rollups import job_ended
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


# Jobs already looked up by (api key id, idempotency key), a pair absent when it has none:
# a batch's, read in one statement (JobRepository.by_idempotency_keys).
EarlierJobs = Mapping[tuple[str, str], Job]


def look_up_idempotent_jobs(session: Session, pairs: Collection[tuple[str, str]]) -> EarlierJobs:
    """The jobs of many (api key id, idempotency key) pairs, read at once for
    find_idempotent_job."""
    return JobRepository(session).by_idempotency_keys(pairs)


def find_idempotent_job(
    session: Session,
    key: ApiKey,
    idempotency_key: str,
    fingerprint: str,
    looked_up: EarlierJobs | None = None,
) -> Job | None:
    """The earlier job for this key within the window, or None. A reuse with another body
    is a conflict; a key older than the window is released for reuse. `looked_up`: the
    jobs of the key's pairs already read, the pair's included (else it is read here)."""
    if looked_up is None:
        existing = JobRepository(session).by_idempotency_key(key.id, idempotency_key)
    else:
        existing = looked_up.get((key.id, idempotency_key))
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
    outcome = prepare_job(session, settings, key, payload, idempotency_header, anthropic_beta)
    if outcome.created:
        add_jobs(session, [outcome.job])
    return outcome


def add_jobs(session: Session, jobs: Sequence[Job]) -> None:
    """Write jobs prepare_job made, in one statement, each published once the session
    commits."""
    JobRepository(session).add_all(jobs)
    for job in jobs:
        outbox.publish_job(session, job.id, job.priority)


def prepare_job(
    session: Session,
    settings: Settings,
    key: ApiKey,
    payload: JobCreate,
    idempotency_header: str | None = None,
    anthropic_beta: str | None = None,
    looked_up: EarlierJobs | None = None,
) -> CreatedJob:
    """Every check of a new job and the job it makes, not yet written (add_jobs writes it):
    or the earlier job its idempotency key names (`looked_up`: see find_idempotent_job).
    Nothing is written here but an expired idempotency key's release, so jobs taken in
    together (api.intake_line) are refused one by one and written as one."""
    idempotency_key = resolve_idempotency_key(payload, idempotency_header)
    fingerprint = request_fingerprint(payload)
    if idempotency_key is not None:
        earlier = find_idempotent_job(session, key, idempotency_key, fingerprint, looked_up)
        if earlier is not None:
            return CreatedJob(job=earlier, created=False)

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
    request = params.to_upstream()
    check_model(key, params.model)
    prices = settings_prices(settings)
    check_priceable(key, request, prices, anthropic_beta)
    cost = max_cost(request, params.model, prices) if key.monthly_budget_usd else None
    check_budget(session, key, cost=cost)
    quotas.check_unfinished_jobs(session, settings, key)
    job = Job(
        id=new_id("job"),
        api_key_id=key.id,
        status=JobStatus.QUEUED,
        model=params.model,
        priority=payload.priority,
        request=request,
        metadata_=payload.metadata,
        webhook_url=payload.target_url,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
        attempts=0,
        max_attempts=settings.max_attempts,
        anthropic_beta=anthropic_beta,
    )
    return CreatedJob(job=job, created=True)


def get_job(session: Session, key: ApiKey, job_id: str) -> Job:
    job = JobRepository(session).get_for_key(job_id, key.id)
    if job is None:
        # Another key's job is "not found" too: its existence is not ours to reveal.
        raise JobNotFound(f"no job {job_id!r} for this API key")
    return job


ORDERS = ("created", "finished")
FINISHED_CURSOR = "fin_"


@dataclass(frozen=True)
class JobPage:
    jobs: Sequence[Job]
    has_more: bool
    next_cursor: str | None


def list_jobs(
    session: Session,
    key: ApiKey,
    status: str | None,
    limit: int,
    after: str | None,
    batch: str | None = None,
    order: str = "created",
) -> JobPage:
    """A page of jobs and the cursor of the next. `order=created` (the default): newest
    first, the cursor being the last id of the page. `order=finished`: finished jobs only,
    the most recently finished first, so a poller reading the first page sees a slow job
    when it finishes, however many jobs were created after it; its cursor carries the
    finish time too. `batch`: a batch's id for its requests only, `none` to leave batch
    requests out (a polling trigger wants one event per job it started)."""
    if status is not None and status not in {s.value for s in JobStatus}:
        allowed = ", ".join(s.value for s in JobStatus)
        raise InvalidJob(f"status: must be one of {allowed}")
    if order not in ORDERS:
        raise InvalidJob(f"order: must be one of {', '.join(ORDERS)}, not {order!r}")
    repository = JobRepository(session)
    if order == "finished":
        before = None if after is None else _read_finished_cursor(after)
        rows = repository.list_finished_for_key(key.id, status, limit + 1, before, batch)
    else:
        if after is not None and after.startswith(FINISHED_CURSOR):
            raise InvalidJob("after: this cursor is from order=finished; send order=finished too")
        rows = repository.list_for_key(key.id, status, limit + 1, after, batch)
    jobs, has_more = rows[:limit], len(rows) > limit
    cursor = None
    if has_more and jobs:
        last = jobs[-1]
        cursor = _finished_cursor(last) if order == "finished" else last.id
    return JobPage(jobs=jobs, has_more=has_more, next_cursor=cursor)


def _finished_cursor(job: Job) -> str:
    assert job.finished_at is not None  # only finished jobs are listed in this order
    position = f"{job.finished_at.astimezone(UTC).isoformat()}|{job.id}"
    return FINISHED_CURSOR + base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


def _read_finished_cursor(cursor: str) -> tuple[datetime, str]:
    """The (finished_at, id) a cursor of order=finished names; InvalidJob for anything
    else (a job id from the default order, say)."""
    problem = InvalidJob(
        "after: not a cursor of order=finished; pass the next_cursor of the previous page "
        "of the same order, or leave it out for the first page"
    )
    if not cursor.startswith(FINISHED_CURSOR):
        raise problem
    encoded = cursor.removeprefix(FINISHED_CURSOR)
    try:
        decoded = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        stamp, job_id = decoded.split("|", 1)
        finished_at = datetime.fromisoformat(stamp)
    except ValueError:
        raise problem from None
    if finished_at.tzinfo is None or not job_id:
        raise problem
    return finished_at, job_id


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
            # Counted below, in this transaction.
            "accounted": 1,
            "updated_at": now,
            "next_attempt_at": None,
        },
    )
    session.refresh(job)
    if canceled and job.batch_id is not None:
        count_ended(session, job.batch_id, "canceled")
    if canceled:
        job_ended(session, job)
    if not canceled:
        if job.status == JobStatus.RUNNING:
            raise JobConflict(
                f"job {job.id} is already running at the upstream and can no longer be canceled"
            )
        if job.status != JobStatus.CANCELED:
            raise JobConflict(f"job {job.id} has already {job.status}; nothing to cancel")
    return job


def cancel_unless_started(session: Session, key: ApiKey, job_id: str) -> None:
    """Cancel a job its caller stopped waiting for, unless it is running or finished: then
    its answer is on its way, and there is nothing to refuse."""
    with contextlib.suppress(JobConflict):
        cancel_job(session, key, job_id)
