"""The sweeper's walk over stale runnable jobs: a keyset cursor carried from pass to pass,
so no due job waits behind a page of older ones, and a time budget per pass."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from promptq.clock import utcnow
from promptq.db import session_scope
from promptq.ids import new_id
from promptq.jobs.sweeping import Candidate, walk_stale
from promptq.keys.service import create_key
from promptq.models import Job, JobStatus


def _stale_jobs(url: str, count: int) -> list[str]:
    """Queued jobs untouched for an hour: each may have lost its message."""
    long_ago = utcnow() - timedelta(hours=1)
    with session_scope(url) as session:
        key = create_key(session, "sweeper").record.id
        ids = sorted(new_id("job") for _ in range(count))
        session.add_all(
            Job(
                id=job_id,
                api_key_id=key,
                status=JobStatus.QUEUED,
                model="claude-sonnet-4-6",
                request={},
                attempts=0,
                max_attempts=4,
                created_at=long_ago,
                updated_at=long_ago,
            )
            for job_id in ids
        )
    return ids


def test_passes_go_on_where_the_last_one_stopped_and_wrap_around(
    fresh_database_url: str, settings: Any
) -> None:
    ids = _stale_jobs(fresh_database_url, 25)
    own = settings.model_copy(update={"database_url": fresh_database_url})
    passes: list[list[str]] = []

    def one_pass(start: str | None) -> str | None:
        seen: list[str] = []

        def handle(candidates: list[Candidate]) -> None:
            seen.extend(c.id for c in candidates)

        # No time at all: one page of 10 per pass.
        cursor = walk_stale(own, start, handle, budget_seconds=0, page=10)
        passes.append(seen)
        return cursor

    cursor = one_pass(None)
    assert passes[0] == ids[:10] and cursor == ids[9]
    cursor = one_pass(cursor)
    assert passes[1] == ids[10:20] and cursor == ids[19]
    # The last five, then round to the beginning, up to where this pass started.
    cursor = one_pass(cursor)
    assert passes[2] == ids[20:] + ids[:10] and cursor == ids[9]
    # Every stale job had its turn within three passes, though a page holds only ten.
    assert set(passes[0] + passes[1] + passes[2]) == set(ids)


def test_with_time_enough_a_pass_walks_everything(fresh_database_url: str, settings: Any) -> None:
    ids = _stale_jobs(fresh_database_url, 25)
    own = settings.model_copy(update={"database_url": fresh_database_url})
    seen: list[str] = []
    start = ids[12]
    cursor = walk_stale(
        own, start, lambda page: seen.extend(c.id for c in page), budget_seconds=60, page=10
    )
    assert cursor is None
    assert seen == ids[13:] + ids[:13]
