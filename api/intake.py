"""Taking a job in, shared by every route that makes jobs (/v1/jobs, /v1/messages, a
template's jobs, batches): the key's intake rate, then store and commit (the job is
published once the commit is done: promptq.outbox), the jobs posted at once together
(take_in, through the app's api.intake_line, to accept_jobs); and a job read back for a
client held open on it. Here, not in one of those routes, so that no route imports
another."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from api.broker import require_broker
from api.deps import app_session
from api.intake_line import IntakeLine, Outcome
from promptq.config import Settings
from promptq.db import Database, on_postgresql, session_scope
from promptq.errors import PromptqError
from promptq.jobs import service
from promptq.jobspec.presenter import job_to_api
from promptq.jobspec.schemas import JobCreate, anthropic_beta
from promptq.keys.policy import quota
from promptq.models import ApiKey, Job
from promptq.quotas import (
    INTAKE_RATE,
    IntakeAsk,
    IntakeTurn,
    QuotaExceeded,
    reserved_at_intake,
)

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


def _too_fast(per_second: float, wait: float) -> QuotaExceeded:
    return QuotaExceeded(
        f"this API key sends more than {per_second:g} jobs a second "
        "(PROMPTQ_KEY_MAX_REQUESTS_PER_SECOND); slow down, or send many prompts at once "
        "as a Message Batch (POST /v1/messages/batches)",
        wait,
    )


@dataclass(frozen=True)
class JobTicket:
    """A job posted, waiting in the intake line (api.intake_line) with what its request
    said besides its body."""

    key: ApiKey
    payload: JobCreate
    idempotency_header: str | None
    beta: str | None  # the anthropic-beta header, for the upstream


def accept_jobs(app: FastAPI, settings: Settings, tickets: Sequence[JobTicket]) -> list[Outcome]:
    """Store and commit the jobs of a batch from the intake line, in order, each job's
    message going once the commit is done: their turns in one Redis round trip, each job's
    checks on its own (a job refused, or whose checks fail, fails alone; one whose
    idempotency key names an earlier job is answered with it), then every new job in one
    INSERT and one commit. Raises what fails them all: the broker away, the database's
    error."""
    require_broker(app.state.broker, "job")
    asks = [_intake_ask(settings, ticket.key) for ticket in tickets]
    turns = app.state.intake_quotas.take_many(asks)
    outcomes: list[Outcome | None] = [None] * len(tickets)
    checked, copies, pairs = _first_look(tickets, asks, turns, outcomes)
    refused_by_constraint = _check_and_write(
        app, settings, tickets, turns, checked, pairs, outcomes
    )
    # One by one now that the batch is committed: copies find their batch's job.
    for index in sorted(copies + refused_by_constraint):
        try:
            outcomes[index] = accept_alone(app, settings, tickets[index], turns[index])
        except Exception as exc:  # its own unit of work, its own error
            outcomes[index] = exc
    return [outcome for outcome in outcomes if outcome is not None]


def _first_look(
    tickets: Sequence[JobTicket],
    asks: Sequence[IntakeAsk],
    turns: Sequence[IntakeTurn],
    outcomes: list[Outcome | None],
) -> tuple[list[int], list[int], set[tuple[str, str]]]:
    """Sort a batch's tickets before the database: refused (past the key's rate, or an
    idempotency key that cannot be), their outcome set; to check together; or a copy of
    an earlier ticket's idempotency key, to take in alone after the batch. Returns the
    indexes to check, those of the copies, and the (api key id, idempotency key) pairs of
    the tickets to check."""
    checked: list[int] = []
    copies: list[int] = []
    pairs: set[tuple[str, str]] = set()
    for index, (ticket, ask, turn) in enumerate(zip(tickets, asks, turns, strict=True)):
        try:
            if turn.wait_seconds > 0:
                raise _too_fast(ask.per_minute / 60, turn.wait_seconds)
            idempotency_key = service.resolve_idempotency_key(
                ticket.payload, ticket.idempotency_header
            )
        except PromptqError as exc:
            outcomes[index] = exc
            continue
        if idempotency_key is not None:
            pair = (ticket.key.id, idempotency_key)
            if pair in pairs:
                copies.append(index)
                continue
            pairs.add(pair)
        checked.append(index)
    return checked, copies, pairs


def _check_and_write(
    app: FastAPI,
    settings: Settings,
    tickets: Sequence[JobTicket],
    turns: Sequence[IntakeTurn],
    checked: Sequence[int],
    pairs: set[tuple[str, str]],
    outcomes: list[Outcome | None],
) -> list[int]:
    """Each checked ticket's job checked, then the new ones written in one INSERT and
    committed, their outcomes set. Returns the indexes of the new jobs to take in alone
    when a constraint refused the INSERT."""
    with closing(app_session(app, settings, intake_autocommits(settings))) as session:
        # The earlier jobs of every idempotency key of the batch, in one statement.
        looked_up = service.look_up_idempotent_jobs(session, pairs)
        new: list[tuple[int, Job]] = []
        for index in checked:
            ticket = tickets[index]
            reserved_at_intake(session, turns[index].reserved)
            try:
                outcome = service.prepare_job(
                    session,
                    settings,
                    ticket.key,
                    ticket.payload,
                    ticket.idempotency_header,
                    ticket.beta,
                    looked_up,
                )
            except PromptqError as exc:
                outcomes[index] = exc
                continue
            except SQLAlchemyError:
                # The database's trouble is every job's: the batch fails as a whole.
                raise
            except Exception as exc:
                # Anything else this job's checks raise (a bug its body runs into) is its
                # own: its request raises it, answered and logged as any route's error
                # is, and the rest of the batch goes on.
                outcomes[index] = exc
                continue
            if outcome.created:
                new.append((index, outcome.job))
            outcomes[index] = job_to_api(outcome.job)
        try:
            service.add_jobs(session, [job for _, job in new])
            session.commit()
        except IntegrityError:
            # A row broke a constraint: most likely an idempotency key another request
            # committed meanwhile. The INSERT wrote none of them (and a rollback drops their
            # messages), so each new job goes alone, and only the one at fault fails.
            session.rollback()
            return [index for index, _ in new]
    return []


def accept_alone(
    app: FastAPI, settings: Settings, ticket: JobTicket, turn: IntakeTurn
) -> dict[str, Any]:
    """One job in a unit of work of its own, its turn taken already (within the key's rate):
    a second job of one idempotency key in a batch, or a job of a batch whose INSERT a
    constraint refused. Its own insert may fail when another request with its idempotency
    key committed first: that request's job is the answer."""
    with closing(app_session(app, settings, intake_autocommits(settings))) as session:
        reserved_at_intake(session, turn.reserved)
        create = (session, settings, ticket.key, ticket.payload, ticket.idempotency_header)
        try:
            outcome = service.create_job(*create, ticket.beta)
            session.commit()
        except IntegrityError:
            session.rollback()
            if service.resolve_idempotency_key(ticket.payload, ticket.idempotency_header) is None:
                raise
            # Another request with the same idempotency key committed first: its job (the
            # rollback dropped the message recorded for the row that lost).
            outcome = service.create_job(*create, ticket.beta)
            if outcome.created:
                raise
        return job_to_api(outcome.job)


def _intake_ask(settings: Settings, key: ApiKey) -> IntakeAsk:
    """What a single job takes at intake: one of the key's intake requests a second
    (PROMPTQ_KEY_MAX_REQUESTS_PER_SECOND), and its room in the key's unfinished count in
    the same Redis round trip (promptq.quotas.IntakeQuotas). Room the count cannot give (it
    is unknown, or at the quota) is left to the job's own check, which counts in the
    database."""
    per_second = quota(key, settings, "requests_per_second")
    most = int(quota(key, settings, "unfinished_jobs"))
    return IntakeAsk(key.id, per_second * 60, INTAKE_BURST_SECONDS, most)


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


def intake_line(app: FastAPI, settings: Settings) -> IntakeLine[JobTicket]:
    """The app's line of jobs posted (api.intake_line), taken in by accept_jobs."""
    return IntakeLine(partial(accept_jobs, app, settings))


async def take_in(
    request: Request,
    settings: Settings,
    key: ApiKey,
    payload: JobCreate,
    idempotency_header: str | None,
) -> dict[str, Any]:
    """The job stored and its answer's body: through the app's intake line. An
    anthropic-beta header goes with the job to the upstream."""
    beta = anthropic_beta(request.headers.get("anthropic-beta"))
    line: IntakeLine[JobTicket] = request.app.state.intake_line
    return await line.take_in(JobTicket(key, payload, idempotency_header, beta))


def read_job(database: Database, key: ApiKey, job_id: str) -> dict[str, Any]:
    with session_scope(database) as session:
        return job_to_api(service.get_job(session, key, job_id))
