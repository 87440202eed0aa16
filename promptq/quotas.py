"""Per-key quotas: what one client key may make or hold, so that no key can harm the others.

Each quota has a setting (PROMPTQ_KEY_MAX_...) and a server default that a single tenant
never meets in ordinary use; an operator may give one key its own (`promptq keys update KEY
--quota NAME=VALUE`, promptq.keys.policy). Counted quotas (unfinished jobs, subscriptions,
templates) are checked against the database where the thing is made, through indexes that hold the
key's own rows; rates (intake requests a second, redeliveries a minute) are kept in Redis
by `promptq.ratelimit.quota`, shared by every API process. A refusal is a 429 with
Retry-After that says which quota, its setting and what to do.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

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

UNFINISHED_STATUSES = (*RUNNABLE_STATUSES, JobStatus.RUNNING)
# A count quota frees up as jobs finish or things are deleted: worth trying again in a while.
COUNT_RETRY_AFTER_SECONDS = 30.0


class QuotaExceeded(RateLimited):
    """A key reached one of its quotas; the API answers 429 with Retry-After."""


def check_unfinished_jobs(
    session: Session, settings: Settings, key: ApiKey, adding: int = 1
) -> None:
    """Room for `adding` more jobs (a batch's requests count one each). The count stops at
    the quota, so it costs at most the quota's rows of the key's index, never history."""
    most = int(quota(key, settings, "unfinished_jobs"))
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
