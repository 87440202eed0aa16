"""Webhook deliveries end to end: a job's end is signed and sent to its webhook_url (n8n's
$execution.resumeUrl), retried on the schedule with the same webhook-id, every attempt
recorded; 410 ends it; redeliver sends the event again. A real receiving server checks the
signature with the standardwebhooks library."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import Receiver, auth, wait_for_status
from standardwebhooks.webhooks import Webhook

from promptq.db import session_scope
from promptq.keys.service import create_key
from promptq.testing import FINAL
from promptq.webhooks.deliveries import RETRY_SCHEDULE, next_delay
from promptq.webhooks.sender import DeliveryResult


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.server.shutdown()


@pytest.fixture
def signed_key(database_url: str, test_env: dict[str, str]) -> tuple[str, str]:
    with session_scope(database_url) as session:
        created = create_key(session, "webhooks")
        return created.key, created.webhook_secret


def test_a_finished_job_is_signed_and_sent_to_its_callback_url(
    client: Any, worker_process: Any, receiver: Receiver, signed_key: tuple[str, str]
) -> None:
    key, secret = signed_key
    job = client.post(
        "/v1/jobs", json={"prompt": "notify me", "callback_url": receiver.url}, headers=auth(key)
    ).json()
    receiver.wait_for(1)
    headers, body, _ = receiver.requests[0]
    payload = Webhook(secret).verify(body, headers)  # raises if the signature is wrong
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == job["id"] and payload["data"]["output_text"]
    assert headers["webhook-id"].startswith("msg_")
    with pytest.raises(Exception):  # noqa: B017  (the library's own verification error)
        Webhook(secret).verify(body.replace(b"notify", b"NOTIFY"), headers)

    finished = wait_for_status(client, key, job["id"], FINAL)
    deadline = time.monotonic() + 5
    while finished["webhook"]["status"] != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.1)
        finished = client.get(f"/v1/jobs/{job['id']}", headers=auth(key)).json()
    assert finished["webhook"] == {"url": receiver.url, "status": "succeeded", "attempts": 1}
    [delivery] = client.get(f"/v1/jobs/{job['id']}/deliveries", headers=auth(key)).json()["data"]
    assert delivery["event_type"] == "job.succeeded"
    assert [a["status_code"] for a in delivery["attempts"]] == [200]
    assert delivery["event_id"] == headers["webhook-id"]


def test_a_failed_job_sends_job_failed(
    client: Any, worker_process: Any, receiver: Receiver, signed_key: tuple[str, str]
) -> None:
    key, secret = signed_key
    client.post(
        "/v1/jobs",
        json={"prompt": f"{uuid.uuid4()} [[sim:400]]", "webhook_url": receiver.url},
        headers=auth(key),
    )
    receiver.wait_for(1)
    headers, body, _ = receiver.requests[0]
    payload = Webhook(secret).verify(body, headers)
    assert payload["type"] == "job.failed"
    assert payload["data"]["error"]["upstream_status"] == 400


def test_a_failed_delivery_is_retried_with_the_same_webhook_id(
    client: Any, worker_process: Any, receiver: Receiver, signed_key: tuple[str, str]
) -> None:
    key, _ = signed_key
    receiver.script = [500]
    job = client.post(
        "/v1/jobs",
        json={"prompt": "retry my webhook", "webhook_url": receiver.url},
        headers=auth(key),
    ).json()
    receiver.wait_for(2, timeout=30)
    (first, _, sent_first), (second, _, sent_second) = receiver.requests[:2]
    assert first["webhook-id"] == second["webhook-id"]
    assert sent_second - sent_first >= RETRY_SCHEDULE[0] - 0.5  # about 5 s
    time.sleep(0.5)
    [delivery] = client.get(f"/v1/jobs/{job['id']}/deliveries", headers=auth(key)).json()["data"]
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 200]
    assert delivery["status"] == "succeeded"


def test_410_gone_ends_the_delivery_and_redeliver_sends_it_again(
    client: Any, worker_process: Any, receiver: Receiver, signed_key: tuple[str, str]
) -> None:
    key, _ = signed_key
    receiver.script = [410]
    job = client.post(
        "/v1/jobs", json={"prompt": "gone", "webhook_url": receiver.url}, headers=auth(key)
    ).json()
    receiver.wait_for(1)
    time.sleep(1.0)
    [delivery] = client.get(f"/v1/jobs/{job['id']}/deliveries", headers=auth(key)).json()["data"]
    assert delivery["status"] == "failed" and len(delivery["attempts"]) == 1
    assert len(receiver.requests) == 1  # no retry after a 410

    again = client.post(f"/v1/jobs/{job['id']}/redeliver", headers=auth(key))
    assert again.status_code == 202
    receiver.wait_for(2)
    assert receiver.requests[1][0]["webhook-id"] == receiver.requests[0][0]["webhook-id"]

    plain = client.post("/v1/jobs?wait=20", json={"prompt": "no hook"}, headers=auth(key)).json()
    refused = client.post(f"/v1/jobs/{plain['id']}/redeliver", headers=auth(key))
    assert refused.status_code == 409


def result(status: int | None, retry_after: float | None = None) -> DeliveryResult:
    return DeliveryResult(
        status_code=status,
        latency_ms=5,
        response_excerpt=None,
        error=None if status else "timeout",
        retry_after=retry_after,
    )


def test_the_retry_schedule() -> None:
    delays = [next_delay(attempt, result(500)) for attempt in range(1, 8)]
    assert delays == [5, 300, 1800, 7200, 18000, 36000, None]
    assert next_delay(1, result(None)) == 5  # a timeout is retried too
    assert next_delay(1, result(429, retry_after=120)) == 120  # retry-after honoured
    assert next_delay(2, result(503, retry_after=10)) == 300  # never sooner than scheduled
    assert next_delay(1, result(410)) is None  # gone: no more attempts


def test_rest_hook_subscriptions(
    client: Any,
    worker_process: Any,
    receiver: Receiver,
    signed_key: tuple[str, str],
    make_key: Any,
) -> None:
    key, secret = signed_key
    created = client.post(
        "/v1/webhooks", json={"url": receiver.url, "events": ["job.succeeded"]}, headers=auth(key)
    )
    assert created.status_code == 201
    hook = created.json()
    assert hook["id"].startswith("whk_") and hook["events"] == ["job.succeeded"]
    listed = client.get("/v1/webhooks", headers=auth(key)).json()["data"]
    assert [h["id"] for h in listed] == [hook["id"]]
    assert (
        client.get(f"/v1/webhooks/{hook['id']}", headers=auth(make_key("other"))).status_code == 404
    )

    job = client.post("/v1/jobs", json={"prompt": "zap me"}, headers=auth(key)).json()
    client.post("/v1/jobs", json={"prompt": f"{uuid.uuid4()} [[sim:400]]"}, headers=auth(key))
    receiver.wait_for(1)
    time.sleep(1.5)  # the failed job must not be sent: job.failed was not asked for
    assert len(receiver.requests) == 1
    headers, body, _ = receiver.requests[0]
    payload = Webhook(secret).verify(body, headers)
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job["id"]

    deleted = client.delete(f"/v1/webhooks/{hook['id']}", headers=auth(key))
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert client.get("/v1/webhooks", headers=auth(key)).json()["data"] == []


def disabled_subscription(client: Any, key: str, hook_id: str) -> dict[str, Any]:
    """The subscription once it says it is disabled, or as it is after 5 s."""
    deadline = time.monotonic() + 5
    while True:
        state: dict[str, Any] = client.get(f"/v1/webhooks/{hook_id}", headers=auth(key)).json()
        if state["disabled_at"] or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def test_410_disables_a_subscription(
    client: Any, worker_process: Any, receiver: Receiver, signed_key: tuple[str, str]
) -> None:
    key, _ = signed_key
    receiver.script = [410]
    hook = client.post("/v1/webhooks", json={"url": receiver.url}, headers=auth(key)).json()
    assert hook["events"] == ["job.failed", "job.succeeded"]
    client.post("/v1/jobs", json={"prompt": "gone for good"}, headers=auth(key))
    receiver.wait_for(1)
    state = disabled_subscription(client, key, hook["id"])
    assert state["disabled_at"] and "410" in state["disabled_reason"]


def test_a_subscription_failing_for_days_is_disabled_and_says_so(
    database_url: str, signed_key: tuple[str, str]
) -> None:
    """The subscription's health as a function of its attempts and an explicit clock."""
    from promptq.keys.service import authenticate
    from promptq.webhooks import subscriptions

    key, _ = signed_key
    failed, ok = result(500), result(200)
    t0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
    with session_scope(database_url) as session:
        hook = subscriptions.subscribe(
            session, authenticate(session, key), "http://127.0.0.1:9/hook", None, True
        )
        assert subscriptions.note_attempt(session, hook.id, failed, t0)
        assert hook.failing_since == t0
        assert subscriptions.note_attempt(session, hook.id, failed, t0 + timedelta(days=2))
        # One success in between starts the count again.
        assert subscriptions.note_attempt(session, hook.id, ok, t0 + timedelta(days=2, hours=1))
        assert hook.failing_since is None
        t1 = t0 + timedelta(days=3)
        assert subscriptions.note_attempt(session, hook.id, failed, t1)
        assert subscriptions.note_attempt(
            session, hook.id, failed, t1 + timedelta(days=2, hours=23)
        )
        assert hook.disabled_at is None
        assert not subscriptions.note_attempt(session, hook.id, failed, t1 + timedelta(days=3))
        assert hook.disabled_at is not None
        assert "every delivery since 2026-11-05T09:00:00Z failed" in hook.disabled_reason
        assert "500" in hook.disabled_reason
        assert hook not in subscriptions.listening(session, hook.api_key_id, "job.succeeded")
        # Once disabled, nothing brings it back but a new subscription.
        assert not subscriptions.note_attempt(session, hook.id, ok, t1 + timedelta(days=4))


def test_a_delivery_to_a_subscription_failing_for_days_is_its_last(
    client: Any, worker_process: Any, receiver: Receiver, signed_key: tuple[str, str]
) -> None:
    from promptq.models import WebhookSubscription

    key, _ = signed_key
    receiver.script = [503]
    hook = client.post("/v1/webhooks", json={"url": receiver.url}, headers=auth(key)).json()
    with session_scope(os.environ["PROMPTQ_DATABASE_URL"]) as session:
        stored = session.get(WebhookSubscription, hook["id"])
        assert stored is not None
        stored.failing_since = datetime.now(UTC) - timedelta(days=4)
    job = client.post("/v1/jobs", json={"prompt": "anyone home?"}, headers=auth(key)).json()
    receiver.wait_for(1)
    state = disabled_subscription(client, key, hook["id"])
    assert state["disabled_at"] and "503" in state["disabled_reason"]
    deliveries = client.get(f"/v1/jobs/{job['id']}/deliveries", headers=auth(key)).json()
    assert [d["status"] for d in deliveries["data"]] == ["failed"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"url": "http://127.0.0.1/x", "events": ["job.done"]}, "events"),
        ({"events": ["job.failed"]}, "url"),
        ({"url": "ftp://example.com/x"}, "url"),
    ],
)
def test_bad_subscriptions_are_refused(
    client: Any, api_key: str, body: dict[str, Any], words: str
) -> None:
    response = client.post("/v1/webhooks", json=body, headers=auth(api_key))
    assert response.status_code == 422
    assert words in response.json()["error"]["message"]
