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
from sqlalchemy import event, select
from sqlalchemy.exc import IntegrityError

from api.app import create_app
from api.intake import JobTicket, accept_jobs
from promptq.config import Settings
from promptq.db import get_engine, session_scope
from promptq.errors import RateLimited
from promptq.jobs import service
from promptq.jobspec.errors import InvalidJob, JobConflict
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
    earlier_key, again = unique("earlier"), unique("again")
    earlier = _ticket(one, earlier_key)
    (earlier_job,) = accept_jobs(app, strict, [earlier])
    assert isinstance(earlier_job, dict)
    tickets = [
        _ticket(one),
        _ticket(one, webhook_url="http://10.0.0.7/n8n"),  # refused: a private address
        _ticket(other),
        first := _ticket(one, again),
        JobTicket(one, first.payload, again, None),  # the same key and body: that job
        *[_ticket(slow) for _ in range(5)],
        _ticket(one),
        JobTicket(one, earlier.payload, earlier_key, None),  # the earlier batch's job
        _ticket(one, earlier_key),  # that key with another body: a conflict
    ]
    lookups: list[str] = []

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if (
            statement.lstrip().upper().startswith("SELECT")
            and "idempotency_key" in (statement.split("WHERE", 1)[-1])
        ):
            lookups.append(statement)

    engine = get_engine(strict)
    event.listen(engine, "before_cursor_execute", on_statement)
    try:
        outcomes = accept_jobs(app, strict, tickets)
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)

    assert len(outcomes) == len(tickets)
    # The batch's idempotency keys read in one statement; its two copies (of `again`, and
    # the conflicting copy of `earlier_key`), taken in alone after it, one each.
    assert len(lookups) == 3
    assert isinstance(outcomes[1], InvalidJob) and "PROMPTQ_WEBHOOK_ALLOW_PRIVATE" in str(
        outcomes[1]
    )
    assert isinstance(outcomes[9], RateLimited)
    assert isinstance(outcomes[12], JobConflict) and earlier_key in str(outcomes[12])
    created = [outcome for index, outcome in enumerate(outcomes) if index in (0, 2, 3, 10)]
    created += outcomes[5:9]
    assert all(isinstance(outcome, dict) for outcome in created)
    assert isinstance(outcomes[4], dict) and outcomes[4]["id"] == outcomes[3]["id"]
    assert isinstance(outcomes[11], dict) and outcomes[11]["id"] == earlier_job["id"]
    job_ids = [outcome["id"] for outcome in created if isinstance(outcome, dict)]
    assert len(set(job_ids)) == len(job_ids) == 8
    assert all(outcome["status"] == "queued" for outcome in created if isinstance(outcome, dict))
    # The earlier batch's one job, then the eight new ones of this batch in one INSERT:
    # the copies found their jobs and wrote nothing.
    assert job_inserts == [1, 8]
    stored = _stored(database_url, job_ids)
    assert set(stored) == set(job_ids)
    assert stored[outcomes[0]["id"]] == one.id and stored[outcomes[2]["id"]] == other.id
    assert {stored[outcome["id"]] for outcome in outcomes[5:9]} == {slow.id}
    published = sorted(str(job_id) for job_id, *_ in sent.of_kind("publish_job"))
    assert published == sorted([*job_ids, earlier_job["id"]])
    # The batch's eight in one call (one Redis round trip: test_publish_messages); the
    # earlier batch's one job alone, as every job posted alone.
    assert sent.batches == [8]


def test_a_row_that_breaks_a_constraint_fails_alone(
    settings: Settings, database_url: str, make_key: Any, job_inserts: list[int]
) -> None:
    """The batch's INSERT writes none of its rows; each job then goes on its own."""
    sent = SentMessages()
    app = create_app(settings, messenger=sent)
    key = _key(database_url, make_key())
    # A key the database does not hold: its job's row breaks the foreign key.
    ghost = ApiKey(id=unique("key_ghost")[:40], name="ghost")
    tickets = [_ticket(key), _ticket(ghost), _ticket(key)]
    first, failed, last = accept_jobs(app, settings, tickets)
    assert isinstance(failed, IntegrityError)
    assert isinstance(first, dict) and isinstance(last, dict)
    assert job_inserts == [3, 1, 1, 1]
    assert set(_stored(database_url, [first["id"], last["id"]])) == {first["id"], last["id"]}
    published = [str(job_id) for job_id, *_ in sent.of_kind("publish_job")]
    assert published == [first["id"], last["id"]]


def test_a_job_whose_checks_fail_fails_alone(
    settings: Settings,
    database_url: str,
    make_key: Any,
    job_inserts: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error other than a refusal, met by one job's checks (a bug), is that job's: the
    rest of its batch is stored and published. The database's errors still fail the batch
    (test_a_row_that_breaks_a_constraint_fails_alone, tests/unit/test_intake_line.py)."""
    sent = SentMessages()
    app = create_app(settings, messenger=sent)
    key = _key(database_url, make_key())
    tickets = [_ticket(key), buggy := _ticket(key), _ticket(key)]
    checks = service.prepare_job

    def prepare_job(session: Any, settings: Settings, key: ApiKey, payload: Any, *rest: Any) -> Any:
        if payload is buggy.payload:
            raise KeyError("a bug in this job's checks")
        return checks(session, settings, key, payload, *rest)

    monkeypatch.setattr(service, "prepare_job", prepare_job)
    first, failed, last = accept_jobs(app, settings, tickets)
    assert isinstance(failed, KeyError)
    assert isinstance(first, dict) and isinstance(last, dict)
    assert job_inserts == [2]
    assert set(_stored(database_url, [first["id"], last["id"]])) == {first["id"], last["id"]}
    published = [str(job_id) for job_id, *_ in sent.of_kind("publish_job")]
    assert published == [first["id"], last["id"]]


def test_an_idempotency_key_committed_meanwhile_answers_with_its_job(
    settings: Settings, database_url: str, make_key: Any, job_inserts: list[int]
) -> None:
    """Another API process commits a job of the same idempotency key between the batch's
    checks and its INSERT: the INSERT fails, and the copy is answered with that job."""
    if get_engine(settings).dialect.name != "postgresql":
        pytest.skip("the race needs a second writer while the batch's reads are open")
    sent = SentMessages()
    app = create_app(settings, messenger=sent)
    key = _key(database_url, make_key())
    racing = _ticket(key, unique("raced"))
    others = [_ticket(key), _ticket(key)]
    theirs: list[str] = []
    racing_now: list[bool] = []

    def commit_theirs_first(
        _conn: Any, _cursor: Any, statement: str, _parameters: Any, _context: Any, _many: bool
    ) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO JOBS ") and not racing_now:
            racing_now.append(True)  # their own INSERT passes through here too
            with session_scope(database_url) as session:
                job = service.create_job(
                    session, settings, key, racing.payload, racing.idempotency_header
                ).job
                theirs.append(job.id)

    engine = get_engine(settings)
    event.listen(engine, "before_cursor_execute", commit_theirs_first)
    try:
        outcomes = accept_jobs(app, settings, [others[0], racing, others[1]])
    finally:
        event.remove(engine, "before_cursor_execute", commit_theirs_first)
    assert all(isinstance(outcome, dict) for outcome in outcomes)
    assert outcomes[1]["id"] == theirs[0]  # type: ignore[index]
    # The batch's INSERT of three (failed), theirs, then the two others alone: the copy
    # found their job and inserted nothing.
    assert job_inserts == [3, 1, 1, 1]
    published = [str(job_id) for job_id, *_ in sent.of_kind("publish_job")]
    assert published == [outcomes[0]["id"], outcomes[2]["id"]]  # type: ignore[index]


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
