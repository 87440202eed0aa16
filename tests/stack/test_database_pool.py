"""A process's PostgreSQL pool: at most pool + overflow connections, and every one it opens
is kept. SQLAlchemy closes an overflow connection as it comes back to a full pool; under a
worker's greenlets, which always want more than the pool keeps, that started a PostgreSQL
backend every few jobs (promptq.db). A worker opens the pool's size of them before it says
it is ready (promptq.db.open_pool)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
from helpers import start_worker, stop_worker
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from promptq.config import Settings
from promptq.db import get_engine, open_pool

POOL, OVERFLOW = 2, 3


@pytest.fixture
def settings(database_url: str) -> Iterator[Settings]:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite's pool is one connection a process")
    # A pool of its own (the engine is cached per URL and pool size), dropped afterwards.
    settings = Settings(
        database_url=database_url, database_pool_size=POOL, database_max_overflow=OVERFLOW
    )
    yield settings
    get_engine(settings).dispose()


def backends_at_once(settings: Settings, count: int) -> set[int]:
    """The server processes behind `count` connections checked out at the same time."""
    engine = get_engine(settings)
    with ExitStack() as held:
        connections = [held.enter_context(engine.connect()) for _ in range(count)]
        return {c.execute(text("SELECT pg_backend_pid()")).scalar_one() for c in connections}


def test_connections_beyond_the_pool_size_are_kept_once_opened(settings: Settings) -> None:
    first = backends_at_once(settings, POOL + OVERFLOW)
    assert len(first) == POOL + OVERFLOW
    assert get_engine(settings).pool.checkedin() == POOL + OVERFLOW  # type: ignore[attr-defined]
    # The same backends serve the next burst: none was closed and opened again.
    assert backends_at_once(settings, POOL + OVERFLOW) == first


def test_a_checkout_beyond_pool_plus_overflow_waits_for_one_to_come_back(
    settings: Settings,
) -> None:
    engine = get_engine(settings)
    with ExitStack() as held:
        connections = [held.enter_context(engine.connect()) for _ in range(POOL + OVERFLOW)]
        pids = [c.execute(text("SELECT pg_backend_pid()")).scalar_one() for c in connections]
        with ThreadPoolExecutor(1) as pool:
            late = pool.submit(backends_at_once, settings, 1)
            time.sleep(0.5)
            assert not late.done()  # no sixth connection opened for it
            connections[0].close()
            assert late.result(timeout=10) == {pids[0]}  # the one that came back


def test_open_pool_opens_connections_that_later_units_of_work_take(settings: Settings) -> None:
    open_pool(settings, POOL)
    engine = get_engine(settings)
    assert engine.pool.checkedin() == POOL  # type: ignore[attr-defined]
    # Checked out at once, they are the ones opened: no backend started for them.
    opened = backends_at_once(settings, POOL)
    assert len(opened) == POOL
    assert engine.pool.checkedin() == POOL  # type: ignore[attr-defined]


def backends_of(database_url: str) -> int:
    """The server processes connected to the database, but for the one asking."""
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
    finally:
        engine.dispose()


def test_a_ready_worker_holds_its_pools_connections_before_any_job(
    fresh_database_url: str, test_env: dict[str, str], tmp_path: Path
) -> None:
    if not fresh_database_url.startswith("postgresql"):
        pytest.skip("SQLite's pool is one connection a process, opened as it is wanted")
    before = backends_of(fresh_database_url)
    env = {
        **test_env,
        "PROMPTQ_DATABASE_URL": fresh_database_url,
        "PROMPTQ_DATABASE_POOL_SIZE": "7",
    }
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        # What the worker opened by the time it said it was ready (without open_pool, none).
        assert backends_of(fresh_database_url) - before >= 7
    finally:
        stop_worker(worker)
