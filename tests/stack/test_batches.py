"""Message Batches from the inside: the batch's shape checks, expiry, the end of a batch
whose last request was canceled on its own, the body limit, and result lines."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from helpers import auth

from promptq import outbox
from promptq.batches import service
from promptq.batches.schemas import MAX_BATCH_REQUESTS, parse_batch_requests
from promptq.clock import utcnow
from promptq.config import Settings
from promptq.db import get_sessionmaker, session_scope
from promptq.jobspec.errors import InvalidJob
from promptq.keys.service import authenticate
from promptq.models import BatchStatus, Job, JobStatus, MessageBatch
from promptq.testing import SentMessages


def params(prompt: str = "hi", **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": prompt}],
        **extra,
    }


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ([], "JSON object"),
        ({"requests": []}, "non-empty"),
        ({"requests": [{"custom_id": "a"}]}, "exactly `custom_id` and `params`"),
        ({"requests": [{"custom_id": "a" * 65, "params": params()}]}, "1 to 64"),
        ({"requests": [{"custom_id": "a", "params": "x"}]}, "params: must be an object"),
        ({"requests": [], "extra": 1}, "unknown field"),
    ],
)
def test_a_batch_of_the_wrong_shape_is_refused_with_the_reason(body: Any, words: str) -> None:
    with pytest.raises(InvalidJob, match=words):
        parse_batch_requests(body)


def test_more_than_100000_requests_are_refused_before_any_is_read() -> None:
    requests = [{"custom_id": f"r{i}", "params": {}} for i in range(MAX_BATCH_REQUESTS + 1)]
    with pytest.raises(InvalidJob, match="more than the 100000"):
        parse_batch_requests({"requests": requests})


def test_invalid_params_become_errored_requests_not_a_refused_batch() -> None:
    parsed = parse_batch_requests(
        {
            "requests": [
                {"custom_id": "ok", "params": params()},
                {"custom_id": "zero", "params": params(max_tokens=0)},
                {"custom_id": "stream", "params": params(stream=True)},
            ]
        }
    )
    assert [p.error is None for p in parsed] == [True, False, False]
    assert "max_tokens" in (parsed[1].error or "") and "stream" in (parsed[2].error or "")


@pytest.fixture
def batch_of_three(
    database_url: str, settings: Settings, api_key: str
) -> Iterator[tuple[str, Any]]:
    """A batch stored but never published, so no worker touches its requests."""
    requests = parse_batch_requests(
        {"requests": [{"custom_id": f"r{i}", "params": params(f"p{i}")} for i in range(3)]}
    )
    with session_scope(database_url) as session:
        key = authenticate(session, api_key)
        assert key is not None
        session.expunge(key)
    sent = SentMessages()
    with session_scope(database_url, sent) as session:
        view = service.create_batch(session, settings, key, requests)
        batch_id = view.batch.id
    # One message feeds the batch's requests; none of them invalid, it has not ended.
    assert sent.sent == [("feed_batch", batch_id)]
    yield batch_id, key


def test_requests_not_finished_in_24_hours_expire_and_the_batch_ends(
    database_url: str, settings: Settings, batch_of_three: tuple[str, Any]
) -> None:
    batch_id, key = batch_of_three
    with session_scope(database_url) as session:
        batch = session.get(MessageBatch, batch_id)
        assert batch is not None and batch.expires_at - batch.created_at == timedelta(hours=24)
        # One request finished before the batch's time ran out.
        first = session.query(Job).filter_by(batch_id=batch_id, custom_id="r0").one()
        first.status, first.finished_at, first.result = JobStatus.SUCCEEDED, utcnow(), {"x": 1}
        session.flush()
        # As a worker's recording does, in the same transaction: the batch counts it (and,
        # not ended, has no batch.ended delivery to send).
        service.request_ended(session, settings, first)
        assert outbox.pending(session) == []
        session.refresh(batch)
        batch.expires_at = utcnow() - timedelta(seconds=1)
    with session_scope(database_url) as session:
        service.expire_and_close(session, settings)
    with session_scope(database_url) as session:
        view = service.get_batch(session, key, batch_id)
        assert view.batch.processing_status == BatchStatus.ENDED
        counts = view.to_api("http://promptq")["request_counts"]
    assert counts == {"processing": 0, "succeeded": 1, "errored": 0, "canceled": 0, "expired": 2}
    lines = [
        json.loads(line)
        for chunk in service.result_lines(get_sessionmaker(database_url), batch_id)
        for line in chunk.splitlines()
    ]
    assert [(line["custom_id"], line["result"]["type"]) for line in lines] == [
        ("r0", "succeeded"),
        ("r1", "expired"),
        ("r2", "expired"),
    ]


def test_a_batch_whose_last_request_was_canceled_alone_is_ended_by_the_sweeper(
    database_url: str, settings: Settings, batch_of_three: tuple[str, Any]
) -> None:
    from promptq.jobs.service import cancel_job

    batch_id, key = batch_of_three
    with session_scope(database_url) as session:
        job_ids = [j.id for j in session.query(Job).filter_by(batch_id=batch_id)]
    for job_id in job_ids:
        with session_scope(database_url) as session:
            cancel_job(session, key, job_id)
    with session_scope(database_url) as session:
        assert service.get_batch(session, key, batch_id).batch.processing_status == "in_progress"
        service.expire_and_close(session, settings)
    with session_scope(database_url) as session:
        view = service.get_batch(session, key, batch_id)
    assert view.batch.processing_status == BatchStatus.ENDED
    assert view.to_api("http://x")["request_counts"]["canceled"] == 3


def test_results_before_the_end_are_refused_and_other_keys_see_nothing(
    client: Any, batch_of_three: tuple[str, Any], api_key: str, make_key: Any
) -> None:
    batch_id, _ = batch_of_three
    early = client.get(f"/v1/messages/batches/{batch_id}/results", headers=auth(api_key))
    assert early.status_code == 400 and "in_progress" in early.json()["error"]["message"]
    assert early.json()["type"] == "error"  # Anthropic's shape on its paths
    other = auth(make_key("someone-else"))
    assert client.get(f"/v1/messages/batches/{batch_id}", headers=other).status_code == 404
    assert client.post(f"/v1/messages/batches/{batch_id}/cancel", headers=other).status_code == 404


def test_batch_bodies_have_their_own_size_limit(settings: Settings, api_key: str) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    small = settings.model_copy(update={"max_batch_bytes": 4096})
    body = {"requests": [{"custom_id": f"r{i}", "params": params("x" * 100)} for i in range(60)]}
    with TestClient(create_app(small)) as client:
        refused = client.post("/v1/messages/batches", json=body, headers=auth(api_key))
        assert refused.status_code == 413
        assert "PROMPTQ_MAX_BATCH_BYTES" in refused.json()["error"]["message"]
        # Other endpoints keep PROMPTQ_MAX_BODY_BYTES, which this body is under.
        job = client.post("/v1/jobs", json={"prompt": "x" * 5000}, headers=auth(api_key))
        assert job.status_code == 202
