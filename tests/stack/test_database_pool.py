"""A process's PostgreSQL pool: at most pool + overflow connections, and every one it opens
is kept. SQLAlchemy closes an overflow connection as it comes back to a full pool; under a
worker's greenlets, which always want more than the pool keeps, that started a PostgreSQL
backend every few jobs (promptq.db)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
from sqlalchemy import text

from promptq.config import Settings
from promptq.db import get_engine

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
