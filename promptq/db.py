"""Engine and session factory. Only the edges (a request, a task) commit; services flush."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy import exc as sqlalchemy_errors
from sqlalchemy.orm import Session, sessionmaker

from promptq import outbox
from promptq.config import get_settings

# A statement's parameters are prompts, results and webhook URLs: an error that is logged
# or shown names the statement, never them.
HIDE_PARAMETERS = True

# What a database that is restarting, unreachable or (SQLite) locked raises: worth waiting
# out, unlike a failed constraint or a bug.
TRANSIENT_DATABASE_ERRORS = (sqlalchemy_errors.OperationalError, sqlalchemy_errors.InterfaceError)


def _configure_sqlite(engine: Engine) -> None:
    # WAL lets the API read while a worker writes; the busy timeout makes concurrent writers
    # (many worker threads, several processes) wait for the lock instead of failing at once.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            hide_parameters=HIDE_PARAMETERS,
        )
        _configure_sqlite(engine)
        return engine
    settings = get_settings()
    return create_engine(
        url,
        hide_parameters=HIDE_PARAMETERS,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
        pool_pre_ping=True,
        pool_timeout=30,
        connect_args=pooler_connect_args(url, settings.database_pooler),
    )


def pooler_connect_args(url: str, pooler: str) -> dict[str, Any]:
    """Behind PgBouncer in transaction pooling, each transaction may run on another server
    connection. psycopg 3 prepares a statement on the server once it has run a few times
    on one connection, and would then meet server connections that never saw it, or hold
    another client's of the same name ("prepared statement _pg3_0 does not exist", or
    "already exists"): with a pooler it prepares nothing. (psycopg2 never prepares.)
    Everything else promptq does holds inside a transaction: SET LOCAL, row locks, no
    session state, no LISTEN."""
    if pooler == "pgbouncer" and make_url(url).get_driver_name() == "psycopg":
        return {"prepare_threshold": None}
    return {}


@lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    factory = sessionmaker(bind=get_engine(url), expire_on_commit=False)
    # What a unit of work records to send (promptq.outbox) goes once it has committed.
    outbox.attach(factory)
    return factory


@contextmanager
def session_scope(url: str, messenger: outbox.Messenger | None = None) -> Iterator[Session]:
    """A unit of work: commits when the block succeeds, rolls back when it raises. What it
    recorded to send goes through `messenger` after the commit (none: the sweeper's, see
    promptq.outbox)."""
    session = outbox.bind(get_sessionmaker(url)(), messenger)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
