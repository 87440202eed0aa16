"""Finding jobs that fell through the cracks: a lost broker message, a dead worker.

The sweeper's decisions live here; what it needs to know about the broker and the
rate-limit queues comes through two small protocols (`Broker`, `RateLimitQueue`), so the
decisions can be read, and tested, apart from Celery and Redis (the real ones are
worker.tasks.sweeper.CeleryBroker and promptq.ratelimit.limiter.RedisLimiter)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy.orm import Session

from promptq import budgets, outbox
from promptq.clock import utcnow
from promptq.config import Settings
from promptq.db import session_scope
from promptq.jobs.end_effects import end_events
from promptq.jobs.repository import JobRepository
from promptq.models import JobStatus

SWEEP_BATCH = 1000


@dataclass
class Reclaimed:
    # The jobs to run again (published once the session commits).
    runnable: list[str] = field(default_factory=list)


def reclaim_expired(session: Session, settings: Settings) -> Reclaimed:
    """Running jobs whose lease ran out (their worker died or hung) become runnable again,
    or fail when that was their last attempt; either way what follows (the job published
    again, or its end's effects) goes once the session commits."""
    repository = JobRepository(session)
    now = utcnow()
    reclaimed = Reclaimed()
    for job in repository.expired_leases(now, SWEEP_BATCH):
        last = job.attempts >= job.max_attempts
        values: dict[str, Any] = {
            "status": JobStatus.FAILED if last else JobStatus.RETRYING,
            "lease_expires_at": None,
            "next_attempt_at": None,
            "updated_at": now,
            "error_type": "worker_lost",
            "error_message": (
                f"the worker running attempt {job.attempts} stopped answering"
                + ("; no attempts left" if last else "; the job will be tried again")
            ),
        }
        if last:
            # Counted by end_events, in this transaction.
            values.update(finished_at=now, accounted=1)
        if not repository.transition(job.id, [JobStatus.RUNNING], values):
            continue
        # The dead worker's budget reservation goes with its claim.
        budgets.release(session, [job.id])
        if last:
            session.refresh(job)
            end_events(session, settings, job)
        else:
            outbox.publish_job(session, job.id, job.priority)
            reclaimed.runnable.append(job.id)
    return reclaimed


@dataclass(frozen=True)
class Candidate:
    id: str
    priority: str
    model: str


def stale_runnable_jobs(
    session: Session,
    settings: Settings,
    after_id: str | None = None,
    up_to_id: str | None = None,
    limit: int = SWEEP_BATCH,
) -> list[Candidate]:
    """Runnable jobs that are due and may have no message: due ones parked in the database
    (a long backoff, a key's rpm), and ones left unclaimed for a while. A page in id order
    within (after_id, up_to_id]."""
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.republish_after_seconds)
    jobs = JobRepository(session).due_for_publish(now, stale_before, limit, after_id, up_to_id)
    return [Candidate(job.id, job.priority, job.model) for job in jobs]


def walk_stale(
    settings: Settings,
    start: str | None,
    handle: Callable[[list[Candidate]], None],
    budget_seconds: float,
    page: int = SWEEP_BATCH,
) -> str | None:
    """One sweeper pass over the stale runnable jobs: pages in id order from `start` (the
    cursor the previous pass left) to the end, then from the beginning up to `start`, each
    page handed to `handle` and read in a short transaction of its own, until everything
    was seen or `budget_seconds` ran out. The cursor for the next pass: None when the walk
    went all the way round.

    Why a cursor: a job stays stale while its message is believed to be in the broker, so
    a pass that always read the first page (ORDER BY id LIMIT) could spend every pass on the
    same thousand old jobs while a due one behind them never got its turn."""
    deadline = time.monotonic() + budget_seconds
    ranges = [(start, None)] + ([(None, start)] if start is not None else [])
    for lower, upper in ranges:
        cursor = lower
        while True:
            with session_scope(settings) as session:
                candidates = stale_runnable_jobs(session, settings, cursor, upper, page)
            if candidates:
                handle(candidates)
            if len(candidates) < page:
                break
            cursor = candidates[-1].id
            if time.monotonic() >= deadline:
                return cursor
    return None


class Broker(Protocol):
    """What the sweeper needs of the message broker."""

    def has_backlog(self) -> bool:
        """Whether job messages wait in the broker, not yet taken by a worker."""
        ...

    def unpublished(self, job_ids: Sequence[str]) -> list[str]:
        """Those of these jobs with no message believed to be in the broker (no live
        publish marker)."""
        ...

    def publish_jobs(self, jobs: Sequence[Candidate]) -> None:
        """Put these jobs' ids on the broker (again), each at its priority."""
        ...


class RateLimitQueue(Protocol):
    """Where jobs wait for their model's rate-limit budget."""

    def queued(self, jobs: list[tuple[str, str]]) -> set[str]:
        """Which of these (job id, model) pairs wait in their model's queue."""
        ...


def republish_lost(
    candidates: Sequence[Candidate], broker: Broker, waiting: RateLimitQueue, backlog: bool
) -> list[Candidate]:
    """Publish again the candidates whose message is lost; returns them.

    A job is accounted for while it waits in its model's rate-limit queue, or while its
    message's marker lives and the broker still holds messages it may be among (`backlog`).
    With the broker's queue empty, a due job nobody claimed lost its message whatever its
    marker says (a worker killed between taking a message and recording it); publishing it
    again is safe, since a job runs only for the delivery that claims it."""
    ids = [candidate.id for candidate in candidates]
    without_marker = set(broker.unpublished(ids)) if backlog else set(ids)
    queued = waiting.queued([(c.id, c.model) for c in candidates if c.id in without_marker])
    lost = [c for c in candidates if c.id in without_marker and c.id not in queued]
    if lost:
        broker.publish_jobs(lost)
    return lost


@dataclass(frozen=True)
class StalePass:
    # The jobs published again, their message being lost.
    republished: list[Candidate]
    # Where the next pass starts; None when this one went all the way round.
    cursor: str | None

    @property
    def drain_now(self) -> bool:
        """Whether the next pass should go on now rather than at beat's next tick: more
        lost jobs than one budget publishes (a wiped Redis), so that they drain at full
        speed in bounded passes. A walk that found only jobs still in the broker (a long
        backlog) waits for the tick."""
        return self.cursor is not None and bool(self.republished)


def republish_stale(
    settings: Settings,
    broker: Broker,
    waiting: RateLimitQueue,
    start: str | None,
    budget_seconds: float,
) -> StalePass:
    """One sweeper pass over the stale runnable jobs from `start` (walk_stale), publishing
    again those whose message is lost (republish_lost)."""
    # Asked once per pass: a broker that holds messages now may hold any stale job's.
    backlog = broker.has_backlog()
    lost: list[Candidate] = []

    def republish(candidates: list[Candidate]) -> None:
        lost.extend(republish_lost(candidates, broker, waiting, backlog))

    cursor = walk_stale(settings, start, republish, budget_seconds=budget_seconds)
    return StalePass(lost, cursor)
