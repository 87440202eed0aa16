"""worker.delivery_sending's DeliverySender: a delivery's POST frees the pool's thread before
its attempt is recorded; the record waits for its turn among the process's records; close()
writes every record still owed. The receiver is a stand-in; the database a SQLite file."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import select

from promptq.config import Settings
from promptq.db import session_scope
from promptq.models import Job, WebhookAttempt, WebhookDelivery
from promptq.webhooks import WebhookSender, deliveries
from promptq.webhooks.deliveries import PreparedDelivery
from promptq.webhooks.sender import DeliveryResult
from worker.deliveries import DeliveryPool
from worker.delivery_sending import DeliverySender


class Receiver:
    """Answers every POST 200 at once, as WebhookSender.post reports it."""

    def __init__(self) -> None:
        self.posted: list[str] = []

    def post(self, url: str, body: bytes, headers: Any) -> DeliveryResult:
        self.posted.append(url)
        return DeliveryResult(200, 1, "ok", None, None)


class Pool:
    """What a sender asks of its pool once the POST has ended."""

    def __init__(self) -> None:
        self.released: list[str] = []
        # Noted rather than refused here: on a recording thread an exception is the
        # sender's to log, and the test would never see it.
        self.retries: list[str] = []

    def release(self, key_id: str) -> None:
        self.released.append(key_id)

    def retry_later(self, delivery_id: str, seconds: float) -> None:
        self.retries.append(delivery_id)


def claimed_delivery(settings: Settings, make_job: Callable[..., str]) -> PreparedDelivery:
    """A job's delivery to its webhook_url, claimed for its first attempt."""
    job_id = make_job(webhook_url="http://receiver.example/hook")
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = "succeeded"
        deliveries.job_event(session, job, subscribed=False)
    with session_scope(settings.database_url) as session:
        delivery_id = session.scalars(
            select(WebhookDelivery.id).where(WebhookDelivery.job_id == job_id)
        ).one()
        prepared = deliveries.take(session, delivery_id)
    assert prepared is not None
    return prepared


def recorded_attempts(settings: Settings, delivery_id: str) -> int:
    with session_scope(settings.database_url) as session:
        attempts = session.scalars(
            select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id)
        ).all()
        return len(attempts)


def test_a_post_frees_its_thread_before_its_record_which_waits_for_its_turn(
    settings: Settings, make_job: Callable[..., str]
) -> None:
    prepared = claimed_delivery(settings, make_job)
    turns = threading.BoundedSemaphore(1)
    receiver, pool = Receiver(), Pool()
    sender = DeliverySender(settings, cast(WebhookSender, receiver), turns)
    turns.acquire()  # a job's record holds the process's one turn
    try:
        sender.send_claimed(prepared, cast(DeliveryPool, pool))
        # Back on the pool's thread: posted, its key's room given back.
        assert receiver.posted == ["http://receiver.example/hook"]
        assert pool.released == [prepared.key_id]
        # Given time, the recording thread still records nothing: the turn is taken.
        time.sleep(0.3)
        assert recorded_attempts(settings, prepared.id) == 0
    finally:
        turns.release()
    sender.close()
    assert recorded_attempts(settings, prepared.id) == 1
    with session_scope(settings.database_url) as session:
        delivery = session.get(WebhookDelivery, prepared.id)
        assert delivery is not None and delivery.status == "succeeded"
    assert pool.retries == []  # answered 200: not retried


def test_a_post_that_ends_after_close_is_recorded_on_its_own_thread(
    settings: Settings, make_job: Callable[..., str]
) -> None:
    prepared = claimed_delivery(settings, make_job)
    sender = DeliverySender(settings, cast(WebhookSender, Receiver()))
    sender.close()
    pool = Pool()
    sender.send_claimed(prepared, cast(DeliveryPool, pool))
    assert recorded_attempts(settings, prepared.id) == 1
    assert pool.retries == []
