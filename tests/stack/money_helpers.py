"""Jobs with known costs written straight to the database, for the usage and budget tests."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from datetime import datetime
from decimal import Decimal
from typing import TypeVar

from promptq import budgets, rollups
from promptq.clock import utcnow
from promptq.db import session_scope
from promptq.ids import new_id
from promptq.keys.service import authenticate
from promptq.models import Job, JobStatus
from promptq.testing import SONNET

K = TypeVar("K", bound=Hashable)


def summed(rows: Iterable[tuple[K, tuple[int, ...]]]) -> dict[K, tuple[int, ...]]:
    """Rollup rows added up by key across their shards (promptq.rollups.ROLLUP_SHARDS), as
    every reader adds them up."""
    totals: dict[K, tuple[int, ...]] = {}
    for key, values in rows:
        before = totals.get(key)
        totals[key] = (
            values if before is None else tuple(a + b for a, b in zip(before, values, strict=True))
        )
    return totals


def key_id_of(database_url: str, plain: str) -> str:
    with session_scope(database_url) as session:
        key = authenticate(session, plain)
        assert key is not None
        return key.id


def add_job(
    database_url: str,
    api_key_id: str,
    finished_at: datetime | None,
    *,
    model: str = SONNET,
    status: str = JobStatus.SUCCEEDED,
    tokens: tuple[int, int, int, int] = (0, 0, 0, 0),
    cost: tuple[str, str, str, str] | None = None,
) -> str:
    """A job as a worker leaves it: `tokens` and `cost` are (input, output, cache write,
    cache read); cost None means no recorded cost (a failure, an unpriced model)."""
    parts = [Decimal(part) for part in cost] if cost is not None else None
    job = Job(
        id=new_id("job"),
        api_key_id=api_key_id,
        status=status,
        model=model,
        request={"model": model, "max_tokens": 10, "messages": []},
        attempts=1,
        max_attempts=4,
        created_at=finished_at or utcnow(),
        started_at=finished_at,
        finished_at=finished_at,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cache_creation_input_tokens=tokens[2],
        cache_read_input_tokens=tokens[3],
        cost_input=parts[0] if parts else None,
        cost_output=parts[1] if parts else None,
        cost_cache_write=parts[2] if parts else None,
        cost_cache_read=parts[3] if parts else None,
        cost_total=sum(parts, Decimal(0)) if parts else None,
        accounted=1 if finished_at is not None and JobStatus(status).is_final else 0,
    )
    with session_scope(database_url) as session:
        session.add(job)
        # As a worker's recording does, in the same transaction as the job's end.
        if finished_at is not None and JobStatus(status).is_final:
            rollups.job_ended(session, job)
        if job.cost_total is not None and finished_at is not None:
            budgets.record_spend(session, api_key_id, finished_at, job.cost_total)
    return job.id
