"""Per-key quotas: what one client key may make or hold, so that no key can harm the others.

Each quota has a setting (PROMPTQ_KEY_MAX_...) and a server default that a single tenant
never meets in ordinary use; an operator may give one key its own (`promptq keys update KEY
--quota NAME=VALUE`, promptq.keys.policy). Counted quotas (unfinished jobs, subscriptions,
templates) are checked against the database where the thing is made, through indexes that
hold the key's own rows (unfinished jobs through a count in Redis first: UnfinishedJobs);
rates (intake requests a second, redeliveries a minute) are kept in Redis by
`promptq.ratelimit.quota`, shared by every API process. A refusal is a 429 with
Retry-After that says which quota, its setting and what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from promptq import redis_keys
from promptq.config import Settings
from promptq.errors import RateLimited
from promptq.keys.policy import quota
from promptq.models import (
    RUNNABLE_STATUSES,
    ApiKey,
    Job,
    JobStatus,
    PromptTemplate,
    WebhookSubscription,
)
from promptq.ratelimit.limiter import _script, run_scripts

log = logging.getLogger(__name__)

UNFINISHED_STATUSES = (*RUNNABLE_STATUSES, JobStatus.RUNNING)
# A count quota frees up as jobs finish or things are deleted: worth trying again in a while.
COUNT_RETRY_AFTER_SECONDS = 30.0
# The rate quota (promptq.ratelimit.quota.RateQuota) intake's requests take from.
INTAKE_RATE = "intake"


class QuotaExceeded(RateLimited):
    """A key reached one of its quotas; the API answers 429 with Retry-After."""


# A key idle this long is counted in the database again at its next intake.
UNFINISHED_COUNT_TTL_MS = 24 * 3600 * 1000
_UNFINISHED = "promptq.quotas.unfinished"
_RESERVED_AT_INTAKE = "promptq.quotas.reserved_at_intake"


class UnfinishedJobs:
    """A count of each key's unfinished jobs in Redis (the limiter's), shared by every API
    process, so that intake's quota check costs one Redis call rather than a count of the
    key's unfinished jobs in the database (up to the quota's rows, 200,000 by default).

    The count is never below the truth but for a moment's race (below): intake adds what
    it takes in, and nothing takes away what finishes, so the count only grows past the
    number of jobs still unfinished. Only when it would pass the quota (or is missing: a
    wiped Redis, a key idle for a day) does the database count, exactly as before, and the
    count starts again from that. So a key well inside its quota never has its jobs
    counted, and one at its quota is refused on the same exact count as ever. A single
    job's room is taken with its intake rate, before the job's checks (IntakeQuotas): a
    request those checks then refuse, or an idempotency key answers with its earlier job,
    has added one all the same, which only brings the next count in the database sooner.

    The race: what other requests add while the database counts, for jobs not yet
    committed, is overwritten by the new count. That lets at most as many jobs through as
    there were intakes in flight at that moment, the same slack as two requests counting
    at once and both inserting; the next count sees them all."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._reserve = _script(client, "unfinished", "quotas")

    def reserve(self, key_id: str, adding: int, most: int) -> bool:
        """Whether `adding` fit in the key's count, and were added to it."""
        keys = [redis_keys.unfinished_jobs(key_id)]
        return bool(self._reserve(keys=keys, args=[adding, most, UNFINISHED_COUNT_TTL_MS]))

    def counted(self, key_id: str, count: int) -> None:
        """The database's count, plus what this intake adds."""
        self.client.set(redis_keys.unfinished_jobs(key_id), count, px=UNFINISHED_COUNT_TTL_MS)


class IntakeAsk(NamedTuple):
    key_id: str
    per_minute: float  # the key's intake rate
    burst_seconds: float  # seconds of it the key may spend at once
    most: int  # the key's quota of unfinished jobs


class IntakeTurn(NamedTuple):
    wait_seconds: float  # 0: the request is within the key's intake rate
    reserved: bool  # room for the job was taken from the key's unfinished count


class IntakeQuotas:
    """A job's two quotas at intake, the key's intake rate (the bucket RateQuota keeps as
    "intake", which batches take from too) and room in its unfinished count
    (UnfinishedJobs), in one Redis script rather than two, and the jobs of a batch in one
    round trip: the two scripts apart took about 0.85 ms of the API's CPU a job on a slow
    hour of the benchmarks' box, a fifth of it (docs/benchmarks.md, "Intake")."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._take = _script(client, "intake", "quotas")

    def take_many(self, asks: Sequence[IntakeAsk]) -> list[IntakeTurn]:
        """The turns of jobs taken in together (api.intake_line), in one round trip, in
        order: each takes from its key's rate and count as if it came alone."""
        calls = [
            (
                self._take,
                [redis_keys.quota(INTAKE_RATE, ask.key_id), redis_keys.unfinished_jobs(ask.key_id)],
                [ask.per_minute, ask.burst_seconds * 1000, ask.most, UNFINISHED_COUNT_TTL_MS],
            )
            for ask in asks
        ]
        return [
            IntakeTurn(float(wait_ms) / 1000, bool(reserved))
            for wait_ms, reserved in run_scripts(self.client, calls)
        ]


def reserved_at_intake(session: Session, reserved: bool) -> None:
    """Whether the job `session` takes in next has its room in the count already
    (IntakeQuotas): then check_unfinished_jobs takes none again. Jobs taken in together
    share a session, so each says its own."""
    if reserved:
        session.info[_RESERVED_AT_INTAKE] = True
    else:
        session.info.pop(_RESERVED_AT_INTAKE, None)


def bind(session: Session, unfinished: UnfinishedJobs | None) -> Session:
    """Have intake on `session` count unfinished jobs through `unfinished` (the API binds
    one to every request's session; None, or nothing bound: the database counts)."""
    if unfinished is None:
        session.info.pop(_UNFINISHED, None)
    else:
        session.info[_UNFINISHED] = unfinished
    return session


def check_unfinished_jobs(
    session: Session, settings: Settings, key: ApiKey, adding: int = 1
) -> None:
    """Room for `adding` more jobs (a batch's requests count one each), taken from the
    count in Redis when one is bound to the session (UnfinishedJobs); else, or when that
    count would pass the quota, counted in the database. The database's count stops at the
    quota, so it costs at most the quota's rows of the key's index, never history."""
    if adding == 1 and session.info.pop(_RESERVED_AT_INTAKE, False):
        return
    most = int(quota(key, settings, "unfinished_jobs"))
    counter: UnfinishedJobs | None = session.info.get(_UNFINISHED)
    if counter is not None:
        try:
            if counter.reserve(key.id, adding, most):
                return
        except redis.RedisError:
            log.warning("could not read the unfinished-jobs count; counting", exc_info=True)
            counter = None
    limited = (
        select(Job.id)
        .where(Job.api_key_id == key.id, Job.status.in_(UNFINISHED_STATUSES))
        .limit(most + 1)
        .subquery()
    )
    unfinished = session.scalar(select(func.count()).select_from(limited)) or 0
    if unfinished + adding > most:
        raise QuotaExceeded(
            f"this API key has {unfinished:,} jobs not yet finished and may have at most "
            f"{most:,} (PROMPTQ_KEY_MAX_UNFINISHED_JOBS, or the key's own quota)"
            + (f"; this request would add {adding:,}" if adding > 1 else "")
            + ": wait for some to finish, or cancel some",
            COUNT_RETRY_AFTER_SECONDS,
        )
    if counter is not None:
        try:
            counter.counted(key.id, unfinished + adding)
        except redis.RedisError:
            log.warning("could not write the unfinished-jobs count", exc_info=True)


def check_subscriptions(session: Session, settings: Settings, key: ApiKey) -> None:
    _check_count(
        session.scalar(select(func.count()).where(WebhookSubscription.api_key_id == key.id)),
        quota(key, settings, "subscriptions"),
        "webhook subscriptions",
        "PROMPTQ_KEY_MAX_SUBSCRIPTIONS",
        "DELETE /v1/webhooks/ID",
    )


def check_templates(session: Session, settings: Settings, key: ApiKey) -> None:
    _check_count(
        session.scalar(select(func.count()).where(PromptTemplate.api_key_id == key.id)),
        quota(key, settings, "templates"),
        "templates",
        "PROMPTQ_KEY_MAX_TEMPLATES",
        "DELETE /v1/templates/NAME",
    )


def _check_count(count: int | None, most: float, things: str, setting: str, delete: str) -> None:
    """Room for one more of a key's things that it deletes itself."""
    if (count or 0) >= most:
        raise QuotaExceeded(
            f"this API key has {count} {things}, the most it may have ({setting}, or the "
            f"key's own quota): delete one ({delete}) first",
            COUNT_RETRY_AFTER_SECONDS,
        )
