"""The unit room: no process is started, no socket opened, no Redis or database server
asked. What runs jobs runs here against the in-memory limiter (promptq.ratelimit.memory)
and the simulator called in-process (doubles.py); the database is a SQLite file of the
test's own, copied from one migrated once per session (migrations make the schema here as
everywhere else). Whatever needs a real Redis, PostgreSQL, worker or HTTP server is tested
in tests/stack.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from doubles import InProcessUpstream
from sqlalchemy.orm import selectinload

from promptq.config import Settings
from promptq.db import get_engine, session_scope
from promptq.jobs.service import create_job
from promptq.jobspec.schemas import JobCreate
from promptq.keys.service import create_key
from promptq.models import ApiKey, Job
from promptq.pricing import PriceTable
from promptq.ratelimit.memory import MemoryLimiter
from promptq.ratelimit.table import LimitTable
from promptq.testing import GENEROUS_LIMITS, SONNET


@pytest.fixture(autouse=True)
def _nothing_leaves_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The room's rule, kept by every test: a socket connecting or a process starting is a
    test that belongs in tests/stack."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("tests/unit opens no connection and starts no process")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(autouse=True)
def _no_outside_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the test alone: not from a developer's PROMPTQ_* variables."""
    for name in list(os.environ):
        if name.startswith("PROMPTQ_") or name == "COMETAPI_KEY":
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def migrated_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from promptq.migrate import upgrade

    path = tmp_path_factory.mktemp("migrated") / "promptq.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    # Closed, so the write-ahead log is folded into the file that the tests copy.
    get_engine(url).dispose()
    return path


@pytest.fixture
def database_url(migrated_database: Path, tmp_path: Path) -> Iterator[str]:
    """An empty, migrated SQLite database of this test's own."""
    path = tmp_path / "promptq.db"
    shutil.copyfile(migrated_database, path)
    url = f"sqlite:///{path}"
    yield url
    get_engine(url).dispose()


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        _env_file=None,
        database_url=database_url,
        upstream_api_key="sk-unit-test",
        max_attempts=3,
        retry_base_seconds=0.2,
        retry_max_seconds=1,
        claim_lease_seconds=30,
    )


@pytest.fixture(scope="session")
def prices() -> PriceTable:
    return PriceTable.load(None)


@pytest.fixture
def limiter() -> MemoryLimiter:
    return MemoryLimiter(LimitTable.from_toml(GENEROUS_LIMITS))


@pytest.fixture
def upstream() -> InProcessUpstream:
    return InProcessUpstream()


@pytest.fixture
def make_key(database_url: str) -> Callable[..., str]:
    """A client key in the test's database; its id."""

    def make(name: str = "unit", **options: Any) -> str:
        with session_scope(database_url) as session:
            return create_key(session, name, **options).record.id

    return make


@pytest.fixture
def make_job(settings: Settings, make_key: Callable[..., str]) -> Callable[..., str]:
    """A job made by the intake service, as POST /v1/jobs makes it; its id. Without a
    key id, a new key of its own."""

    def make(prompt: str = "Say hello.", key_id: str | None = None, **fields: Any) -> str:
        key_id = key_id or make_key()
        fields.setdefault("model", SONNET)
        fields.setdefault("max_tokens", 64)
        with session_scope(settings.database_url) as session:
            key = session.get(ApiKey, key_id)
            assert key is not None
            created = create_job(session, settings, key, JobCreate(prompt=prompt, **fields))
            return created.job.id

    return make


@pytest.fixture
def job_of(database_url: str) -> Callable[[str], Job]:
    """The job's row as it is now, with its attempts loaded."""

    def load(job_id: str) -> Job:
        with session_scope(database_url) as session:
            job = session.get(Job, job_id, options=[selectinload(Job.attempt_records)])
            assert job is not None
            return job

    return load
