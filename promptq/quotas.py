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

log = logging.getLogger(__name__)

UNFINISHED_STATUSES = (*RUNNABLE_STATUSES, JobStatus.RUNNING)
# A count quota frees up as jobs finish or things are deleted: worth trying again in a while.
COUNT_RETRY_AFTER_SECONDS = 30.0


class QuotaExceeded(RateLimited):
    """A key reached one of its quotas; the API answers 429 with Retry-After."""


# Adds `adding` to a key's count unless the count is unknown or would pass the quota.
# KEYS: 1 the count. ARGV: 1 adding, 2 the quota, 3 the count's lifetime (ms).
# Returns 1 when added, 0 when the database must count.
_RESERVE = """
local count = redis.call('GET', KEYS[1])
if not count or tonumber(count) + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# A key idle this long is counted in the database again at its next intake.
UNFINISHED_COUNT_TTL_MS = 24 * 3600 * 1000
_UNFINISHED = "promptq.quotas.unfinished"


class UnfinishedJobs:
    """A count of each key's unfinished jobs in Redis (the limiter's), shared by every API
    process, so that intake's quota check costs one Redis call rather than a count of the
    key's unfinished jobs in the database (up to the quota's rows, 200,000 by default).

    The count is never below the truth but for a moment's race (below): intake adds what
    it takes in, and nothing takes away what finishes, so the count only grows past the
    number of jobs still unfinished. Only when it would pass the quota (or is missing: a
    wiped Redis, a key idle for a day) does the database count, exactly as before, and the
    count starts again from that. So a key well inside its quota never has its jobs
    counted, and one at its quota is refused on the same exact count as ever.

    The race: what other requests add while the database counts, for jobs not yet
    committed, is overwritten by the new count. That lets at most as many jobs through as
    there were intakes in flight at that moment, the same slack as two requests counting
    at once and both inserting; the next count sees them all."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._reserve = client.register_script(_RESERVE)

    def reserve(self, key_id: str, adding: int, most: int) -> bool:
        """Whether `adding` fit in the key's count, and were added to it."""
        keys = [redis_keys.unfinished_jobs(key_id)]
        return bool(self._reserve(keys=keys, args=[adding, most, UNFINISHED_COUNT_TTL_MS]))

    def counted(self, key_id: str, count: int) -> None:
        """The database's count, plus what this intake adds."""
        self.client.set(redis_keys.unfinished_jobs(key_id), count, px=UNFINISHED_COUNT_TTL_MS)


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
