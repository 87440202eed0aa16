"""Taking a job in, shared by every route that makes jobs (/v1/jobs, /v1/messages, a
template's jobs, batches): the key's intake rate, then store and commit (the job is
published once the commit is done: promptq.outbox); and a job
read back for a client held open on it. Here, not in one of those routes, so that no route
imports another."""

from __future__ import annotations

from contextlib import closing
from typing import Any

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import Request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.broker import require_broker
from api.deps import request_session
from promptq.config import Settings
from promptq.db import Database, on_postgresql, session_scope
from promptq.jobs import service
from promptq.jobspec.presenter import job_to_api
from promptq.jobspec.schemas import JobCreate, anthropic_beta
from promptq.keys.policy import quota
from promptq.models import ApiKey
from promptq.quotas import INTAKE_RATE, QuotaExceeded, reserved_at_intake

# Bodies posted as forms, by tools that only post flat fields.
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

# Seconds of a key's intake rate it may spend at once (a client's burst after a pause).
INTAKE_BURST_SECONDS = 2.0


def check_intake_rate(request: Request, settings: Settings, key: ApiKey) -> None:
    """One of the key's intake requests a second (PROMPTQ_KEY_MAX_REQUESTS_PER_SECOND),
    shared by every API process; a 429 when they are spent."""
    per_second = quota(key, settings, "requests_per_second")
    wait = request.app.state.quotas.take(INTAKE_RATE, key.id, per_second * 60, INTAKE_BURST_SECONDS)
    if wait > 0:
        raise _too_fast(per_second, wait)


def take_intake_turn(request: Request, settings: Settings, key: ApiKey, session: Session) -> None:
    """check_intake_rate for a single job, taking its room in the key's unfinished count
    in the same Redis round trip (promptq.quotas.IntakeQuotas). Room the count cannot give
    (it is unknown, or at the quota) is left to the job's own check, which counts in the
    database."""
    per_second = quota(key, settings, "requests_per_second")
    most = int(quota(key, settings, "unfinished_jobs"))
    turn = request.app.state.intake_quotas.take(key.id, per_second * 60, INTAKE_BURST_SECONDS, most)
    if turn.wait_seconds > 0:
        raise _too_fast(per_second, turn.wait_seconds)
    if turn.reserved:
        reserved_at_intake(session)


def _too_fast(per_second: float, wait: float) -> QuotaExceeded:
    return QuotaExceeded(
        f"this API key sends more than {per_second:g} jobs a second "
        "(PROMPTQ_KEY_MAX_REQUESTS_PER_SECOND); slow down, or send many prompts at once "
        "as a Message Batch (POST /v1/messages/batches)",
        wait,
    )


def accept_job(
    request: Request,
    settings: Settings,
    key: ApiKey,
    payload: JobCreate,
    idempotency_header: str | None,
) -> dict[str, Any]:
    """Store and commit, the job's message going once the commit is done: one trip to the
    thread pool per job, since intake runs hundreds of times a second. An anthropic-beta
    header goes with the job to the upstream."""
    beta = anthropic_beta(request.headers.get("anthropic-beta"))
    require_broker(request.app.state.broker, "job")
    with closing(request_session(request, settings, intake_autocommits(settings))) as session:
        take_intake_turn(request, settings, key, session)
        try:
            outcome = service.create_job(session, settings, key, payload, idempotency_header, beta)
            session.commit()
        except IntegrityError:
            # Another request with the same idempotency key committed first: its job (the
            # rollback drops the message recorded for the row that lost).
            session.rollback()
            outcome = service.create_job(session, settings, key, payload, idempotency_header, beta)
            if outcome.created:
                raise
        return job_to_api(outcome.job)


def intake_autocommits(settings: Settings) -> bool:
    """Whether intake's unit of work runs in autocommit: on PostgreSQL, where BEGIN and
    COMMIT are a round trip each, two of the three a job makes to the database. It needs no
    transaction around it. Its one write is the job's row (with an idempotency key, an
    expired key's release may go before it: right on its own); its reads (an idempotency
    key's earlier job, a budget's spend) see committed rows either way, as each statement
    does at READ COMMITTED; a duplicate idempotency key fails the insert just as in a
    transaction. Its messages still go once the session commits (promptq.outbox), so after
    the row."""
    return on_postgresql(settings)


def intake_threads(settings: Settings) -> CapacityLimiter:
    """The threads intake runs in, as many as the database pool's size: each holds one
    connection for its insert and commit, and the rest of the pool (its overflow) stays for
    the API's other routes. These threads take about two thirds of intake's CPU and the
    event loop's thread a third (per-thread CPU, README "Throughput"). With 1, 2 or 10 of
    them intake took 149 to 233 jobs/s, with 5 173 to 205, in alternating runs on a noisy
    box: no clear difference, so the pool's size stays their number. With 40, when the
    pool still closed its overflow connections as they came back (promptq.db), it opened
    and closed them by the hundred a second, a PostgreSQL backend started each time."""
    return CapacityLimiter(settings.database_pool_size)


async def take_in(
    request: Request,
    settings: Settings,
    key: ApiKey,
    payload: JobCreate,
    idempotency_header: str | None,
) -> dict[str, Any]:
    """accept_job in one of intake's threads (intake_threads)."""
    return await anyio.to_thread.run_sync(
        accept_job,
        request,
        settings,
        key,
        payload,
        idempotency_header,
        limiter=request.app.state.intake_threads,
    )


def read_job(database: Database, key: ApiKey, job_id: str) -> dict[str, Any]:
    with session_scope(database) as session:
        return job_to_api(service.get_job(session, key, job_id))
