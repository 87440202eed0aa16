"""promptq.outbox: what a unit of work records to send goes after its commit, in order, and
never after a rollback. No processes: an in-memory messenger and SQLite."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from sqlalchemy import text

from promptq import outbox
from promptq.config import Settings
from promptq.db import get_sessionmaker, session_scope
from promptq.jobs import service as jobs
from promptq.jobs.sweeping import stale_runnable_jobs
from promptq.jobspec.schemas import JobCreate
from promptq.models import ApiKey
from promptq.testing import SentMessages


@pytest.fixture
def scratch_url(tmp_path: Path) -> str:
    """A database of one table: the outbox knows nothing of promptq's."""
    url = f"sqlite:///{tmp_path / 'scratch.db'}"
    with session_scope(url) as session:
        session.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY)"))
    return url


def _note(session: object, number: int) -> None:
    session.execute(text("INSERT INTO notes (id) VALUES (:id)"), {"id": number})  # type: ignore[attr-defined]


def test_messages_go_after_the_commit_in_the_order_they_were_recorded(scratch_url: str) -> None:
    sent = SentMessages()
    with session_scope(scratch_url, sent) as session:
        _note(session, 1)
        outbox.publish_job(session, "job_1", "high")
        outbox.deliver_webhook(session, "dlv_1")
        outbox.announce_finished(session, "job_1")
        outbox.feed_batch(session, "msgbatch_1")
        outbox.publish_job(session, "job_2", "low", 4.5)
        session.flush()
        assert sent.sent == []  # nothing before the commit
    assert sent.sent == [
        ("publish_job", "job_1", "high", None),
        ("deliver_webhook", "dlv_1"),
        ("announce_finished", "job_1"),
        ("feed_batch", "msgbatch_1"),
        ("publish_job", "job_2", "low", 4.5),
    ]


def test_jobs_to_publish_now_one_after_another_go_together(scratch_url: str) -> None:
    """A run of two or more jobs to publish now (an intake batch's) is one publish_jobs
    call, in place; a job alone, or one to publish later, goes as before."""
    sent = SentMessages()
    with session_scope(scratch_url, sent) as session:
        _note(session, 6)
        outbox.publish_job(session, "job_1", "high")
        outbox.publish_job(session, "job_2", "low")
        outbox.publish_job(session, "job_3", "normal")
        outbox.announce_finished(session, "job_0")
        outbox.publish_job(session, "job_4", "normal")
        outbox.publish_job(session, "job_5", "normal", 2.0)
        outbox.publish_job(session, "job_6", "normal")
        outbox.publish_job(session, "job_7", "high")
    assert sent.batches == [3, 2]
    assert sent.sent == [
        ("publish_job", "job_1", "high", None),
        ("publish_job", "job_2", "low", None),
        ("publish_job", "job_3", "normal", None),
        ("announce_finished", "job_0"),
        ("publish_job", "job_4", "normal", None),
        ("publish_job", "job_5", "normal", 2.0),
        ("publish_job", "job_6", "normal", None),
        ("publish_job", "job_7", "high", None),
    ]


class FailingPublish(SentMessages):
    def publish_jobs(self, jobs: Sequence[tuple[str, str]]) -> None:
        raise ConnectionError("the broker is away")


def test_jobs_published_together_that_fail_are_logged_and_the_rest_still_goes(
    scratch_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    sent = FailingPublish()
    with (
        caplog.at_level(logging.WARNING, "promptq.outbox"),
        session_scope(scratch_url, sent) as session,
    ):
        _note(session, 7)
        outbox.publish_job(session, "job_1", "normal")
        outbox.publish_job(session, "job_2", "normal")
        outbox.announce_finished(session, "job_0")
    assert sent.sent == [("announce_finished", "job_0")]
    assert "could not send 2 jobs' messages now; the sweeper will" in caplog.text


def test_a_rollback_drops_what_was_recorded(scratch_url: str) -> None:
    sent = SentMessages()
    with pytest.raises(RuntimeError), session_scope(scratch_url, sent) as session:
        _note(session, 2)
        outbox.publish_job(session, "job_lost", "normal")
        raise RuntimeError("the unit of work fails")
    assert sent.sent == []
    with session_scope(scratch_url) as session:
        assert session.execute(text("SELECT count(*) FROM notes WHERE id = 2")).scalar() == 0


def test_a_session_committed_by_hand_sends_once_per_transaction(scratch_url: str) -> None:
    """As a route does: its own session, bound to the app's messenger, committed by hand."""
    sent = SentMessages()
    session = outbox.bind(get_sessionmaker(scratch_url)(), sent)
    try:
        _note(session, 3)
        outbox.deliver_webhook(session, "dlv_rolled_back")
        session.rollback()
        _note(session, 4)
        outbox.deliver_webhook(session, "dlv_committed")
        session.commit()
        session.commit()  # an empty transaction sends nothing again
        outbox.deliver_webhook(session, "dlv_never_committed")
        assert outbox.pending(session) == [outbox.DeliverWebhook("dlv_never_committed")]
    finally:
        session.close()
    assert sent.deliveries == ["dlv_committed"]
    assert outbox.pending(session) == []


class FailingDelivery(SentMessages):
    def deliver_webhook(self, delivery_id: str) -> None:
        raise ConnectionError("the broker is away")


def test_a_send_that_fails_is_logged_and_the_commit_stands(
    scratch_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    sent = FailingDelivery()
    with (
        caplog.at_level(logging.WARNING, "promptq.outbox"),
        session_scope(scratch_url, sent) as session,
    ):
        _note(session, 5)
        outbox.deliver_webhook(session, "dlv_1")
        outbox.announce_finished(session, "job_1")
    # The next message still went; the failed one is the sweeper's.
    assert sent.sent == [("announce_finished", "job_1")]
    assert "could not send" in caplog.text and "the sweeper will" in caplog.text
    with session_scope(scratch_url) as session:
        assert session.execute(text("SELECT count(*) FROM notes WHERE id = 5")).scalar() == 1


def _key(database_url: str, key_id: str) -> ApiKey:
    with session_scope(database_url) as session:
        key = session.get(ApiKey, key_id)
        assert key is not None
        session.expunge(key)
    return key


def test_a_created_job_is_published_after_its_commit_and_only_once(
    settings: Settings, make_key: Callable[..., str]
) -> None:
    url = settings.database_url
    key = _key(url, make_key())
    body = JobCreate.model_validate({"prompt": "hi", "idempotency_key": "outbox-once"})
    sent = SentMessages()
    with session_scope(url, sent) as session:
        job = jobs.create_job(session, settings, key, body).job
    assert sent.sent == [("publish_job", job.id, "normal", None)]
    # The same idempotency key again: the earlier job, not published twice.
    with session_scope(url, sent) as session:
        assert jobs.create_job(session, settings, key, body).job.id == job.id
    assert len(sent.sent) == 1


def test_without_a_messenger_the_message_is_dropped_and_the_sweeper_finds_the_job(
    settings: Settings, make_key: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """A process with no messenger (the command line, a script) loses nothing: the job is
    committed, and the sweeper's next pass publishes it as a job whose message was lost."""
    url = settings.database_url
    key = _key(url, make_key())
    with caplog.at_level(logging.DEBUG, "promptq.outbox"), session_scope(url) as session:
        job = jobs.create_job(session, settings, key, JobCreate.model_validate({"prompt": "x"})).job
    assert "left to the sweeper" in caplog.text
    # Once it has waited PROMPTQ_REPUBLISH_AFTER_SECONDS (none here), it is the sweeper's.
    eager = settings.model_copy(update={"republish_after_seconds": 0})
    with session_scope(url) as session:
        assert job.id in [candidate.id for candidate in stale_runnable_jobs(session, eager)]
