"""Jobs taken in together (api.intake_line, api.intake.accept_jobs), against the real
database and Redis: one INSERT for the jobs of a batch, each job's refusal its own, an
idempotency key still answered with its first job, every stored job published once, and a
write that fails storing none of its batch. Then many clients posting at once through the
app: every job answered, stored and published once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import auth, key_id_of, unique
from sqlalchemy import event, func, select
from sqlalchemy.exc import IntegrityError

from api.app import create_app
from api.intake import JobTicket, accept_jobs
from promptq.config import Settings
from promptq.db import get_engine, session_scope
from promptq.errors import RateLimited
from promptq.jobspec.errors import InvalidJob
from promptq.jobspec.schemas import JobCreate
from promptq.models import ApiKey, Job
from promptq.testing import SONNET, SentMessages


@pytest.fixture
def job_inserts(settings: Settings) -> Iterator[list[int]]:
    """For each INSERT of jobs' rows on the API's engine, how many rows it wrote."""
    seen: list[int] = []
    lock = threading.Lock()
    engine = get_engine(settings)

    def on_statement(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool
    ) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO JOBS "):
            # Many rows are one executemany (SQLite) or one statement of many VALUES
            # (PostgreSQL, SQLAlchemy's "insertmanyvalues").
            rows = len(parameters) if many else statement.count("), (") + 1
            with lock:
                seen.append(rows)

    event.listen(engine, "before_cursor_execute", on_statement)
    yield seen
    event.remove(engine, "before_cursor_execute", on_statement)


def _key(database_url: str, plain: str) -> ApiKey:
    with session_scope(database_url) as session:
        key = session.get(ApiKey, key_id_of(database_url, plain))
        assert key is not None
        session.expunge(key)
        return key


def _ticket(key: ApiKey, idempotency_key: str | None = None, **body: Any) -> JobTicket:
    payload = JobCreate.model_validate(
        {"prompt": unique("together"), "model": SONNET, "max_tokens": 16, **body}
    )
    return JobTicket(key, payload, idempotency_key, None)


def _stored(database_url: str, job_ids: list[str]) -> dict[str, str]:
    """job id: its key's id, of the jobs among `job_ids` that have a row."""
    with session_scope(database_url) as session:
        rows = session.execute(select(Job.id, Job.api_key_id).where(Job.id.in_(job_ids)))
        return {job_id: key_id for job_id, key_id in rows}


def test_a_batch_is_one_insert_and_each_job_is_answered_on_its_own(
    settings: Settings, database_url: str, make_key: Any, job_inserts: list[int]
) -> None:
    strict = settings.model_copy(update={"webhook_allow_private": False})
    sent = SentMessages()
    app = create_app(strict, messenger=sent)
    one, other = _key(database_url, make_key()), _key(database_url, make_key())
    # Two requests a second, two seconds of them at once: four jobs, then 429s.
    slow = _key(database_url, make_key(quotas={"requests_per_second": 2}))
    again = unique("again")
    tickets = [
        _ticket(one),
        _ticket(one, webhook_url="http://10.0.0.7/n8n"),  # refused: a private address
        _ticket(other),
        first := _ticket(one, again),
        JobTicket(one, first.payload, again, None),  # the same key and body: that job
        *[_ticket(slow) for _ in range(5)],
        _ticket(one),
    ]
    outcomes = accept_jobs(app, strict, tickets)

    assert len(outcomes) == len(tickets)
    assert isinstance(outcomes[1], InvalidJob) and "PROMPTQ_WEBHOOK_ALLOW_PRIVATE" in str(
        outcomes[1]
    )
    assert isinstance(outcomes[9], RateLimited)
    created = [outcome for index, outcome in enumerate(outcomes) if index not in (1, 4, 9)]
    assert all(isinstance(outcome, dict) for outcome in created)
    assert isinstance(outcomes[4], dict) and outcomes[4]["id"] == outcomes[3]["id"]
    job_ids = [outcome["id"] for outcome in created if isinstance(outcome, dict)]
    assert len(set(job_ids)) == len(job_ids) == 8
    assert all(outcome["status"] == "queued" for outcome in created if isinstance(outcome, dict))
    # The jobs without an idempotency key in one INSERT, the one with a key in its own;
    # its copy found it and wrote nothing.
    assert job_inserts == [7, 1]
    stored = _stored(database_url, job_ids)
    assert set(stored) == set(job_ids)
    assert stored[job_ids[0]] == one.id and stored[job_ids[1]] == other.id
    assert [stored[job_id] for job_id in job_ids[3:7]] == [slow.id] * 4
    assert sorted(str(job_id) for job_id, *_ in sent.of_kind("publish_job")) == sorted(job_ids)


def test_a_write_that_fails_stores_none_of_its_batch(
    settings: Settings, database_url: str, make_key: Any, job_inserts: list[int]
) -> None:
    sent = SentMessages()
    app = create_app(settings, messenger=sent)
    key = _key(database_url, make_key())
    # A key the database does not hold: its job's row breaks the foreign key.
    ghost = ApiKey(id=unique("key_ghost")[:40], name="ghost")
    tickets = [_ticket(key), _ticket(ghost), _ticket(key)]
    with pytest.raises(IntegrityError):
        accept_jobs(app, settings, tickets)
    assert job_inserts == [3]
    with session_scope(database_url) as session:
        count = session.scalar(
            select(func.count()).select_from(Job).where(Job.api_key_id == key.id)
        )
    assert count == 0
    assert sent.of_kind("publish_job") == []


def test_clients_posting_at_once_are_each_answered_stored_and_published_once(
    settings: Settings, database_url: str, make_key: Any, job_inserts: list[int]
) -> None:
    sent = SentMessages()
    app = create_app(settings, messenger=sent)
    keys = [make_key() for _ in range(3)]

    def post(number: int) -> Any:
        body = {"prompt": unique("at once"), "model": SONNET, "max_tokens": 16}
        return client.post("/v1/jobs", json=body, headers=auth(keys[number % len(keys)]))

    # The test client's requests from many threads meet on its one event loop, as a
    # server's from many connections do.
    with TestClient(app) as client, ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(post, range(60)))
    assert [answer.status_code for answer in answers] == [202] * 60, answers[0].text
    job_ids = [answer.json()["id"] for answer in answers]
    assert len(set(job_ids)) == 60
    assert sum(job_inserts) == 60
    assert len(_stored(database_url, job_ids)) == 60
    assert sorted(str(job_id) for job_id, *_ in sent.of_kind("publish_job")) == sorted(job_ids)
