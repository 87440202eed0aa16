"""Engine and session factory. Only the edges (a request, a task) commit; services flush."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy import exc as sqlalchemy_errors
from sqlalchemy.orm import Session, sessionmaker

from promptq import outbox
from promptq.config import Settings, get_settings
from promptq.statement_cache import cache_long_statements

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


def _green_sqlite_pool() -> dict[str, Any]:
    """In a gevent worker, one SQLite connection per process. SQLite takes one writer at a
    time, and a writer that finds the lock taken waits in SQLite's C code (busy_timeout),
    which gevent cannot switch away from: were the lock held by another greenlet of the
    same process (one that yields on a Redis call in its transaction), the whole process
    would stand still until the timeout. With one connection, greenlets queue for it in the
    pool, where they yield. Other processes (the API) only ever wait on a lock that is
    released, since the holder's process keeps running."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("socket"):
        return {"pool_size": 1, "max_overflow": 0}
    return {}


# What names a database: the settings (its URL, its pool's size, its pooler), or a URL
# alone, for tools and tests, which take the default pool. What a caller was given is what
# its engine is built from; the global settings only say, for a bare URL, whether a pooler
# stands in front of it (see get_engine).
Database = Settings | str
DEFAULT_POOL_SIZE: int = Settings.model_fields["database_pool_size"].default
DEFAULT_MAX_OVERFLOW: int = Settings.model_fields["database_max_overflow"].default


def get_engine(database: Database) -> Engine:
    """The process's engine for the database (one per URL and pool size)."""
    if isinstance(database, str):
        # A pooler in front of the server is a fact of the deployment, not of one engine,
        # and a bare URL cannot say it: migrations and tools that pass a URL through
        # PgBouncer must still prepare nothing, so it comes from the environment (as does
        # the network timeout).
        settings = get_settings()
        return _engine(
            database,
            DEFAULT_POOL_SIZE,
            DEFAULT_MAX_OVERFLOW,
            settings.database_pooler,
            settings.database_network_timeout_seconds,
        )
    return _engine(
        database.database_url,
        database.database_pool_size,
        database.database_max_overflow,
        database.database_pooler,
        database.database_network_timeout_seconds,
    )


def on_postgresql(where: Database | Engine | Connection | Session) -> bool:
    """Whether `where` (settings, a URL, or what a statement runs on) is PostgreSQL: where
    some units of work run as one statement in autocommit, which SQLite, whose BEGIN and
    COMMIT are no round trips, has no need of."""
    if isinstance(where, Session):
        bind: Engine | Connection = where.get_bind()
    elif isinstance(where, Engine | Connection):
        bind = where
    else:
        bind = get_engine(where)
    return bind.dialect.name == "postgresql"


def open_pool(database: Database, connections: int) -> None:
    """Build the process's engine and open the first `connections` of its pool now rather
    than when the first units of work want them: a worker's first jobs would otherwise
    import the driver, build the engine and open its connections in the middle of the
    worker's first wave of answers (py-spy: the engine 9% of that first second's samples,
    the connections 7%), where under gevent each wait is a turn behind every other ready
    greenlet. On PostgreSQL only: a SQLite connection costs no round trip, and a gevent
    worker keeps one. `connections`: at most the pool's size, or the last would wait for one
    to come back."""
    engine = get_engine(database)
    if not on_postgresql(engine):
        return
    with ExitStack() as opened:
        # All checked out at once, so that each is a connection of its own; all back in the
        # pool however far it got (one that fails stops it: a database away is waited for
        # once, not once per connection).
        for _ in range(connections):
            opened.enter_context(engine.connect())


@lru_cache(maxsize=8)
def _engine(
    url: str, pool_size: int, max_overflow: int, pooler: str, network_timeout: float
) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            hide_parameters=HIDE_PARAMETERS,
            **_green_sqlite_pool(),
        )
        _configure_sqlite(engine)
        return engine
    cache_long_statements()
    engine = create_engine(
        url,
        hide_parameters=HIDE_PARAMETERS,
        # Every connection opened is kept: the pool's size is pool + overflow, opened as
        # they are first wanted, and none is an "overflow" one that SQLAlchemy closes as it
        # comes back to a full pool. A worker's hundreds of greenlets always want more than
        # the pool keeps, and that churn started a PostgreSQL backend every few jobs: 771
        # sessions for 2,000 jobs, and 21.6 s of PostgreSQL's CPU, against 39 and 5.5 to
        # 7.2 s with every connection kept (bench/throughput.py --latency 0).
        pool_size=pool_size + max_overflow,
        max_overflow=0,
        # No ping before every checkout (a round trip per transaction): see _ping_when_idle.
        pool_pre_ping=False,
        pool_timeout=30,
        connect_args={
            **network_connect_args(url, network_timeout),
            **pooler_connect_args(url, pooler),
        },
    )
    _ping_when_idle(engine)
    return engine


# A connection back in the pool for longer than this is pinged before it is handed out.
IDLE_PING_SECONDS = 10.0


def _ping_when_idle(engine: Engine) -> None:
    """Disconnects handled without a round trip on the hot path. A connection that has sat
    idle (a quiet spell, when a database restart or a pooler's idle timeout goes unnoticed)
    is pinged when it is checked out, and replaced if the ping fails. One in constant use is
    not: if the database went away under it, its next statement fails with an error
    SQLAlchemy knows as a disconnect, which invalidates it and every connection made before
    it (the pool starts afresh), and the caller retries at once (`reconnected`): a job's
    record (promptq.jobs.runner), a task (worker.tasks.base), or the client a 503 told to."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("checked_in_at")
        if since is None or time.monotonic() - since < IDLE_PING_SECONDS:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception:
            alive = False
        if not alive:
            # The pool drops the connection and checks out another (a new one, if need be).
            raise sqlalchemy_errors.DisconnectionError("the database dropped an idle connection")


def reconnected(error: BaseException) -> bool:
    """Whether `error` was a connection the database had dropped (SQLAlchemy invalidated it,
    and the pool with it): a retry at once gets a new one."""
    return isinstance(error, sqlalchemy_errors.DBAPIError) and error.connection_invalidated


# Connecting gives up after this long at most (libpq's connect_timeout, whole seconds).
CONNECT_TIMEOUT_SECONDS = 10


def network_connect_args(url: str, timeout: float) -> dict[str, Any]:
    """libpq's TCP settings (psycopg 3 and psycopg2 pass them on) for a PostgreSQL host that
    stops answering without closing anything: a network partition, a host gone, a NAT or
    firewall entry forgotten. By default the kernel retransmits for about 15 minutes before
    a statement fails, a connect tries for about 2, and after a partition of a few minutes
    TCP's backoff waits up to 2 more minutes before it tries again, however soon the
    network is back. With these, a statement whose packets go unacknowledged for `timeout`
    seconds (TCP_USER_TIMEOUT), or an idle connection whose keepalives go unanswered as
    long, fails as a lost connection: SQLAlchemy drops it (and the pool with it) and the
    caller's retry connects afresh (promptq.db.reconnected), each connect giving up after
    CONNECT_TIMEOUT_SECONDS. A slow statement is not affected: the server's kernel
    acknowledges it while the server works. A setting in the URL's query wins."""
    if not url.startswith("postgresql"):
        return {}
    seconds = max(2, int(timeout))
    chosen: dict[str, Any] = {
        "connect_timeout": min(CONNECT_TIMEOUT_SECONDS, seconds),
        "keepalives": 1,
        # Probes start after a third of the timeout idle, every sixth: the connection is
        # dropped about `timeout` seconds after its host went silent.
        "keepalives_idle": max(1, seconds // 3),
        "keepalives_interval": max(1, seconds // 6),
        "keepalives_count": 4,
        "tcp_user_timeout": seconds * 1000,
    }
    given = make_url(url).query
    return {name: value for name, value in chosen.items() if name not in given}


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


def get_sessionmaker(database: Database, autocommit: bool = False) -> sessionmaker[Session]:
    engine = get_engine(database)
    return _sessionmaker(_autocommitting(engine) if autocommit else engine)


@lru_cache(maxsize=8)
def _autocommitting(engine: Engine) -> Engine:
    """The engine's connections (the same pool) in autocommit: each statement its own
    transaction, with no BEGIN or COMMIT sent around it."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


@lru_cache(maxsize=8)
def _sessionmaker(engine: Engine) -> sessionmaker[Session]:
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    # What a unit of work records to send (promptq.outbox) goes once it has committed.
    outbox.attach(factory)
    return factory


@contextmanager
def session_scope(
    database: Database, messenger: outbox.Messenger | None = None, autocommit: bool = False
) -> Iterator[Session]:
    """A unit of work: commits when the block succeeds, rolls back when it raises. What it
    recorded to send goes through `messenger` after the commit (none: the sweeper's, see
    promptq.outbox). `autocommit`: every statement commits on its own, for a unit of work
    of one statement (promptq.jobs.execution.records_alone), which then costs one round
    trip rather than three; what it sends still goes once the block has succeeded."""
    session = outbox.bind(get_sessionmaker(database, autocommit)(), messenger)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
