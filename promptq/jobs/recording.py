"""An attempt recorded in one statement on PostgreSQL: the attempt's row, the job's
compare-and-set to its next status, the webhook deliveries of its end, its hour's usage, the
call's hour and the key's spend, as the data-modifying CTEs of one statement, so that the
common job pays one round trip for all of it (promptq.jobs.execution.record_attempt writes
the same rows one statement each on SQLite, which has no data-modifying CTE, and for a
batch's request, whose batch row comes between the job and its rollups).

What depends on the compare-and-set winning (the deliveries, the usage row, the spend) adds
a row once for each row the job's UPDATE returned, so none when another took the job back.
The parts run in the house order (job, usage, attempts, ledger: see record_attempt), each
reading the one before it: PostgreSQL runs a data-modifying CTE to its end when another part
reads it.

One statement, not a transaction of several, matters most for the rollups: every job of a
key and model in an hour writes the same two rows, whose locks last until the commit. Held
across more round trips (the deliveries' insert once came after the record, in the same
transaction), they made the key's records wait on one another: 200 jobs with a webhook ended
at 50 a second, and their records took 200 ms and more (bench/webhook_delay.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    ARRAY,
    CTE,
    Select,
    any_,
    bindparam,
    false,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Session

from promptq import budgets
from promptq.jobs.repository import revoked_of_job, subscribed_of_job
from promptq.models import Attempt, AttemptHourlyShard, Job, UsageHourlyShard, WebhookDelivery
from promptq.rollups import (
    ATTEMPT_COUNTS,
    ATTEMPT_SHARD_KEYS,
    USAGE_COUNTS,
    USAGE_SHARD_KEYS,
    EndedJob,
    RecordedAttempt,
    attempt_rows,
    follows,
    upsert_after,
    usage_rows,
)


@dataclass(frozen=True)
class Record:
    """What one attempt writes."""

    job_id: str
    api_key_id: str
    attempt: dict[str, Any]
    settle_from: Sequence[str]
    values: dict[str, Any]
    call: RecordedAttempt
    # The job's end, counted only if the compare-and-set wins (None: it does not end).
    ended: EndedJob | None
    # Its cost, booked in the key's spend ledger on the same condition.
    spend: Decimal | None
    finished_at: datetime
    # The deliveries of its end (promptq.webhooks.deliveries.job_event_rows), written on the
    # same condition.
    deliveries: Sequence[dict[str, Any]] = ()


def record_in_one(session: Session, record: Record) -> tuple[bool, bool, bool]:
    """(settled, subscribed, revoked): whether the job's compare-and-set won, whether its
    key has a webhook subscription in force (see JobRepository.settle), and, for a record
    that writes deliveries, whether the key has been revoked (False for any other)."""
    usage = usage_rows([record.ended])[0] if record.ended is not None else None
    [call] = attempt_rows([record.call])
    spend = (
        budgets.spend_row(record.api_key_id, record.finished_at, record.spend)
        if record.spend is not None
        else None
    )
    statement = _statement(
        Shape(
            attempt=tuple(record.attempt),
            values=tuple(record.values),
            usage=tuple(usage) if usage is not None else None,
            call=tuple(call),
            spend=spend is not None,
            deliveries=len(record.deliveries),
        )
    )
    params: dict[str, Any] = {"job_id": record.job_id, "settle_from": list(record.settle_from)}
    for prefix, row in (
        ("a_", record.attempt),
        ("v_", record.values),
        ("u_", usage or {}),
        ("c_", call),
        ("s_", spend or {}),
    ):
        params.update({f"{prefix}{name}": value for name, value in row.items()})
    for index, delivery in enumerate(record.deliveries):
        params.update({f"d{index}_{name}": delivery[name] for name in DELIVERY_COLUMNS})
    # As Core, on the session's connection: nothing of it is an ORM object to track.
    won, subscribed, _, revoked = session.connection().execute(statement, params).one()
    return bool(won), bool(subscribed), bool(revoked)


@dataclass(frozen=True)
class Shape:
    """The columns one attempt's statement writes: a handful of shapes in all (a success,
    a retry, a failure; a key with a budget or without), each built once."""

    attempt: tuple[str, ...]
    values: tuple[str, ...]
    usage: tuple[str, ...] | None  # None: the job does not end
    call: tuple[str, ...]
    spend: bool
    deliveries: int = 0


# The columns of a delivery's row the statement writes (all but finished_at, NULL until it
# ends).
DELIVERY_COLUMNS = (
    "id",
    "event_id",
    "job_id",
    "api_key_id",
    "subscription_id",
    "url",
    "event_type",
    "body",
    "attempts",
    "status",
    "next_attempt_at",
    "created_at",
)


@lru_cache(maxsize=64)
def _statement(shape: Shape) -> Select[Any]:
    """The statement of one shape, every value a bound parameter (a_ the attempt's, v_ the
    job's new values, u_ its hour's usage, c_ the call's hour, s_ the spend): built, and so
    compiled, once per shape rather than once per job, which cost more CPU than the rest of
    the job's path together."""
    jobs = Job.__table__.c
    attempts = Attempt.__table__.c
    attempt = (
        insert(Attempt)
        .values({name: bindparam(f"a_{name}", type_=attempts[name].type) for name in shape.attempt})
        .cte("attempt")
    )
    settled = (
        update(Job)
        .where(
            Job.id == bindparam("job_id"),
            # One array parameter (PostgreSQL's = ANY), not an "expanding" IN list, whose
            # statement SQLAlchemy would render again on every execution.
            Job.status == any_(bindparam("settle_from", type_=ARRAY(Job.__table__.c.status.type))),
        )
        .values({name: bindparam(f"v_{name}", type_=jobs[name].type) for name in shape.values})
        .returning(
            Job.id,
            subscribed_of_job().label("subscribed"),
            # Only a record that writes deliveries asks: whether they may be sent at once.
            (revoked_of_job() if shape.deliveries else false()).label("revoked"),
        )
        .cte("settled")
    )
    parts: list[CTE] = [attempt, settled]
    # New rows, which no other job waits on: where they run among the parts does not matter
    # (PostgreSQL runs the parts nothing reads once the rest is done).
    parts += [_delivery(index, settled) for index in range(shape.deliveries)]
    if shape.usage is not None:
        parts.append(
            upsert_after(
                UsageHourlyShard, USAGE_SHARD_KEYS, USAGE_COUNTS, shape.usage, "u_", source=settled
            ).cte("usage")
        )
    after = follows(parts[-1]) if shape.usage is not None else None
    parts.append(
        upsert_after(
            AttemptHourlyShard, ATTEMPT_SHARD_KEYS, ATTEMPT_COUNTS, shape.call, "c_", after=after
        ).cte("calls")
    )
    if shape.spend:
        parts.append(budgets.spend_after("s_", settled, follows(parts[-1])).cte("ledger"))
    # Read in this order: the job's row first, then the last part, which reads the others.
    return select(
        select(func.count()).select_from(settled).scalar_subquery(),
        select(settled.c.subscribed).scalar_subquery(),
        select(func.count()).select_from(parts[-1]).scalar_subquery(),
        select(settled.c.revoked).scalar_subquery(),
    ).add_cte(*parts)


def _delivery(index: int, settled: CTE) -> CTE:
    """The insert of the job's `index`th delivery (parameters d{index}_), one row for each
    row of `settled`: none when the compare-and-set lost."""
    columns = WebhookDelivery.__table__.c
    row = select(
        *(
            bindparam(f"d{index}_{name}", type_=columns[name].type).label(name)
            for name in DELIVERY_COLUMNS
        )
    ).select_from(settled)
    return (
        insert(WebhookDelivery)
        .from_select(DELIVERY_COLUMNS, row, include_defaults=False)
        .cte(f"delivery{index}")
    )
