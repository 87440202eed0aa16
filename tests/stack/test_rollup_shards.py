"""The hourly rollups' shards (promptq.rollups.ROLLUP_SHARDS): recordings spread an hour's
figures over several rows of the shards tables, readers add them up with the rollups'
tables, the hours over are folded into those (promptq.rollups.folding), and migration 0014
only adds tables: what the previous release wrote, and goes on writing until restarted,
counts the same; downgraded, the shards are folded in first."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from alembic import command
from conftest import database_at
from sqlalchemy import bindparam, func, inspect, select, text

from promptq import rollups
from promptq.db import get_engine, session_scope
from promptq.keys.service import create_key
from promptq.metrics import MetricsRepository
from promptq.migrate import alembic_config, upgrade
from promptq.models import (
    AttemptHourlyShard,
    UsageHourly,
    UsageHourlyShard,
    WebhookHourly,
    WebhookHourlyShard,
)
from promptq.rollups.folding import fold_closed_hours
from promptq.rollups.reading import rollup_rows
from promptq.testing import SONNET
from promptq.types import UTCDateTime

HOUR = datetime(2026, 11, 30, 10, tzinfo=UTC)
ENDS = 40
# Stored as the model's columns store times (SQLite compares them as text).
HOUR_PARAM = bindparam("hour", type_=UTCDateTime())


@pytest.fixture
def at_0013(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A database of the kind of `database_url` at the schema before the shards."""
    with database_at("0013", database_url, tmp_path) as url:
        yield url


def _previous_release_adds_usage(url: str, key_id: str, jobs: int, output_tokens: int) -> None:
    """An hour's usage added to usage_hourly as the release before the shards does."""
    with get_engine(url).begin() as connection:
        connection.execute(
            text(
                "INSERT INTO usage_hourly (hour, api_key_id, model, status, priced, jobs, "
                "input_tokens, output_tokens, cache_creation_input_tokens, "
                "cache_read_input_tokens, cost_total, cost_input, cost_output, "
                "cost_cache_write, cost_cache_read) "
                "VALUES (:hour, :key, :model, 'succeeded', false, :jobs, 0, :tokens, 0, 0, "
                "0, 0, 0, 0, 0) "
                "ON CONFLICT (hour, api_key_id, model, status, priced) DO UPDATE SET "
                "jobs = usage_hourly.jobs + excluded.jobs, "
                "output_tokens = usage_hourly.output_tokens + excluded.output_tokens"
            ).bindparams(HOUR_PARAM),
            {"hour": HOUR, "key": key_id, "model": SONNET, "jobs": jobs, "tokens": output_tokens},
        )


def _seed_unsharded(url: str) -> str:
    """One row in each rollup table, written as the schema before the shards had them."""
    with session_scope(url) as session:
        key_id = create_key(session, "shards").record.id
    _previous_release_adds_usage(url, key_id, jobs=3, output_tokens=60)
    counts = ", ".join(f"le_{index}" for index in range(12))
    with get_engine(url).begin() as connection:
        connection.execute(
            text(
                "INSERT INTO attempt_hourly (hour, api_key_id, model, outcome, status_code, "
                f"attempts, latency_ms_sum, {counts}) VALUES (:hour, :key, :model, "
                f"'succeeded', '200', 3, 900, {', '.join(['3'] * 12)})"
            ).bindparams(HOUR_PARAM),
            {"hour": HOUR, "key": key_id, "model": SONNET},
        )
        connection.execute(
            text(
                "INSERT INTO webhook_hourly (hour, kind, name, count) "
                "VALUES (:hour, 'attempt', 'sent', 3)"
            ).bindparams(HOUR_PARAM),
            {"hour": HOUR},
        )
    return key_id


def test_shards_are_added_up_with_what_the_previous_release_writes(at_0013: str) -> None:
    url = at_0013
    key_id = _seed_unsharded(url)
    upgrade(url)
    # A process of the previous release, not yet restarted, adds to usage_hourly as it did.
    _previous_release_adds_usage(url, key_id, jobs=2, output_tokens=40)
    with session_scope(url) as session:
        kept = session.scalars(select(UsageHourly)).one()
        assert (kept.jobs, kept.output_tokens) == (5, 100)

    # Recordings of this release, one at a time as many workers' would be: each in a shard
    # of its own picking.
    _record(url, key_id, HOUR + timedelta(minutes=5), ENDS)
    with session_scope(url) as session:
        shards = set(session.scalars(select(UsageHourlyShard.shard)))
        # 40 recordings all in one of 8 shards: a chance of 8**-39.
        assert len(shards) > 1
        assert shards <= set(range(rollups.ROLLUP_SHARDS))
        totals = MetricsRepository(session).totals(HOUR, None)
    model = totals.jobs[SONNET]
    assert model.by_status == {"succeeded": 5 + ENDS}
    assert model.tokens["output"] == 100 + 20 * ENDS
    assert totals.attempts[SONNET].count == 3 + ENDS
    assert totals.attempts[SONNET].latency_ms_sum == 900 + 100 * ENDS

    # Downgraded: the shards are folded in, every hour of them, then dropped.
    command.downgrade(alembic_config(url), "0013")
    with get_engine(url).connect() as connection:
        assert "usage_hourly_shards" not in inspect(connection).get_table_names()
        usage = connection.execute(text("SELECT jobs, output_tokens FROM usage_hourly")).all()
        attempts = connection.execute(
            text("SELECT attempts, latency_ms_sum, le_0 FROM attempt_hourly")
        ).all()
        webhooks = connection.execute(text("SELECT count FROM webhook_hourly")).all()
    assert [tuple(row) for row in usage] == [(5 + ENDS, 100 + 20 * ENDS)]
    assert [tuple(row) for row in attempts] == [(3 + ENDS, 900 + 100 * ENDS, 3 + ENDS)]
    assert [tuple(row) for row in webhooks] == [(3 + ENDS,)]
    # And up again.
    upgrade(url)
    with session_scope(url) as session:
        assert session.scalars(select(UsageHourly.jobs)).all() == [5 + ENDS]
        assert session.scalar(select(UsageHourly.cost_total)) == Decimal(0)
        assert session.scalars(select(UsageHourlyShard)).all() == []


def _record(url: str, key_id: str, at: datetime, times: int) -> None:
    """`times` recordings of a job's end, its call and a webhook attempt, at `at`."""
    ended = rollups.EndedJob(key_id, SONNET, "succeeded", at, tokens=(10, 20, 0, 0))
    call = rollups.RecordedAttempt(key_id, SONNET, at, "succeeded", 200, latency_ms=100)
    for _ in range(times):
        with session_scope(url) as session:
            rollups.jobs_ended(session, [ended])
            rollups.attempts_recorded(session, [call])
            rollups.webhook_attempt_recorded(
                session, rollups.webhook_attempt_rows(at, "sent", None)
            )


def _rows(url: str) -> dict[datetime, tuple[int, int | None]]:
    """By hour: (its rows in usage_hourly_shards, its jobs in usage_hourly: None if none)."""
    found: dict[datetime, tuple[int, int | None]] = {}
    with session_scope(url) as session:
        for hour in session.scalars(select(UsageHourlyShard.hour)):
            shards, folded = found.get(hour, (0, None))
            found[hour] = (shards + 1, folded)
        for row in session.scalars(select(UsageHourly)):
            shards, _ = found.get(row.hour, (0, None))
            found[row.hour] = (shards, row.jobs)
    return found


def _figures(url: str, since: datetime) -> tuple[int, int, int]:
    """(jobs ended, calls, webhook attempts) since `since`, as the readers add them up."""
    with session_scope(url) as session:
        totals = MetricsRepository(session).totals(since, None)
        hooks = rollup_rows(WebhookHourly)
        webhooks = session.scalar(select(func.sum(hooks.c.count))) or 0
    return (
        sum(totals.jobs[SONNET].by_status.values()),
        totals.attempts[SONNET].count,
        int(webhooks),
    )


def test_the_hours_over_are_folded_into_one_row_and_the_current_ones_left(
    fresh_database_url: str,
) -> None:
    url = fresh_database_url
    with session_scope(url) as session:
        key_id = create_key(session, "folding").record.id
    now = datetime.now(UTC)
    current = rollups.floor_hour(now)
    old = [current - timedelta(hours=hours) for hours in (5, 4, 3)]
    for hour in [*old, current]:
        _record(url, key_id, hour + timedelta(minutes=7), ENDS)
    before = _figures(url, old[0])
    assert before == (4 * ENDS, 4 * ENDS, 4 * ENDS)
    assert all(shards > 1 and folded is None for shards, folded in _rows(url).values())

    # At most two hours a table per pass, the oldest first.
    assert fold_closed_hours(url, now=now, hours_per_pass=2) == 3 * 2
    rows = _rows(url)
    assert rows[old[0]] == rows[old[1]] == (0, ENDS)
    assert rows[old[2]][1] is None and rows[current][1] is None
    assert fold_closed_hours(url, now=now, hours_per_pass=2) == 3
    assert fold_closed_hours(url, now=now) == 0
    rows = _rows(url)
    assert rows[old[2]] == (0, ENDS)
    # The hour under way (and the one before it, for late recordings) stays spread.
    assert rows[current][0] > 1 and rows[current][1] is None
    assert _figures(url, old[0]) == before
    with session_scope(url) as session:
        for shards in (AttemptHourlyShard, WebhookHourlyShard):
            assert session.scalars(select(shards.hour).where(shards.hour < current)).all() == []

    # A recording late for a folded hour lands in a shard again; the next pass folds it.
    _record(url, key_id, old[1] + timedelta(minutes=9), ENDS)
    assert _rows(url)[old[1]][1] == ENDS
    assert fold_closed_hours(url, now=now) == 3
    assert _rows(url)[old[1]] == (0, 2 * ENDS)
    assert _figures(url, old[0]) == (5 * ENDS, 5 * ENDS, 5 * ENDS)


def test_a_fold_loses_nothing_recorded_while_it_runs(fresh_database_url: str) -> None:
    """Recorders add to an hour that is over while folds of it run over and over: every
    recording is counted once, in usage_hourly after the last fold."""
    url = fresh_database_url
    with session_scope(url) as session:
        key_id = create_key(session, "racing").record.id
    now = datetime.now(UTC)
    hour = rollups.floor_hour(now) - timedelta(hours=3)
    recorders, each = 4, 50
    done = threading.Event()
    errors: list[BaseException] = []

    def record() -> None:
        try:
            _record(url, key_id, hour + timedelta(minutes=1), each)
        except BaseException as error:
            errors.append(error)

    def fold() -> None:
        try:
            while not done.is_set():
                fold_closed_hours(url, now=now)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=record) for _ in range(recorders)]
    folder = threading.Thread(target=fold)
    folder.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    done.set()
    folder.join(timeout=60)
    assert not errors
    fold_closed_hours(url, now=now)
    total = recorders * each
    assert _rows(url) == {hour: (0, total)}
    assert _figures(url, hour) == (total, total, total)
