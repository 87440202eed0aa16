"""Intake's unit of work runs in autocommit on PostgreSQL (api.intake.intake_autocommits):
the job's row is inserted with no BEGIN and COMMIT round trips around it and reads back at
once; on SQLite it stays one transaction. (That its message follows and a worker runs the
job, test_end_to_end shows: its jobs are posted through this same in-process API.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import unique
from sqlalchemy import event

from promptq.config import Settings
from promptq.db import get_engine
from promptq.testing import SONNET


@pytest.fixture
def job_inserts(settings: Settings) -> Iterator[list[bool]]:
    """For each INSERT of a job's row on the API's engine, whether its connection was in
    autocommit when the statement was sent."""
    seen: list[bool] = []
    lock = threading.Lock()
    engine = get_engine(settings)

    def on_statement(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO JOBS "):
            with lock:
                seen.append(getattr(conn.connection.dbapi_connection, "autocommit", False) is True)

    event.listen(engine, "before_cursor_execute", on_statement)
    yield seen
    event.remove(engine, "before_cursor_execute", on_statement)


def test_a_jobs_row_is_inserted_in_autocommit_on_postgresql_only(
    client: Any, api_key: str, settings: Settings, job_inserts: list[bool]
) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    body = {"prompt": unique("autocommit"), "model": SONNET, "max_tokens": 16}
    created = client.post("/v1/jobs", json=body, headers=headers)
    assert created.status_code == 202, created.text
    on_postgresql = get_engine(settings).dialect.name == "postgresql"
    assert job_inserts == [on_postgresql]
    # Committed on its own: another session reads it back.
    read = client.get(f"/v1/jobs/{created.json()['id']}", headers=headers)
    assert read.status_code == 200
    assert read.json()["id"] == created.json()["id"]


def test_an_idempotency_key_in_autocommit_returns_the_first_job(
    client: Any, api_key: str, job_inserts: list[bool]
) -> None:
    """The second request finds the first's committed row and inserts nothing."""
    headers = {"Authorization": f"Bearer {api_key}", "Idempotency-Key": unique("idem")}
    body = {"prompt": unique("autocommit"), "model": SONNET, "max_tokens": 16}
    first = client.post("/v1/jobs", json=body, headers=headers)
    again = client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 202, first.text
    # 200 once the session's worker has run the job: the first job, as it is now.
    assert again.status_code in (200, 202), again.text
    assert again.json()["id"] == first.json()["id"]
    assert len(job_inserts) == 1
