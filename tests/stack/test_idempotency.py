"""Idempotent submission, as n8n's and Zapier's retries need it: the same Idempotency-Key
and body return the first job, also when many copies race; another body is a 409."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import requests
from sqlalchemy import func, select

from promptq.clock import utcnow
from promptq.db import session_scope
from promptq.models import Job


def jobs_with_key(database_url: str, idempotency_key: str) -> int:
    with session_scope(database_url) as session:
        query = select(func.count()).select_from(Job).where(Job.idempotency_key == idempotency_key)
        return int(session.scalar(query) or 0)


def test_twenty_racing_copies_make_one_job(
    api_server: str, api_key: str, database_url: str
) -> None:
    barrier = threading.Barrier(20)
    answers: list[Any] = []
    lock = threading.Lock()

    def post() -> None:
        session = requests.Session()
        barrier.wait()
        response = session.post(
            f"{api_server}/v1/jobs",
            json={"prompt": "race me", "metadata": {"order": 42}},
            headers={"x-api-key": api_key, "Idempotency-Key": "race-42"},
            timeout=30,
        )
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=post) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(answers) == 20
    assert {response.status_code for response in answers} <= {200, 202}
    assert len({response.json()["id"] for response in answers}) == 1
    assert jobs_with_key(database_url, "race-42") == 1


def test_same_key_another_body_is_a_conflict(api_server: str, api_key: str) -> None:
    headers = {"x-api-key": api_key, "Idempotency-Key": "conflict-1"}
    first = requests.post(
        f"{api_server}/v1/jobs", json={"prompt": "one"}, headers=headers, timeout=10
    )
    assert first.status_code == 202
    second = requests.post(
        f"{api_server}/v1/jobs", json={"prompt": "two"}, headers=headers, timeout=10
    )
    assert second.status_code == 409
    assert first.json()["id"] in second.json()["error"]["message"]


def test_a_key_is_free_again_after_24_hours(
    api_server: str, api_key: str, database_url: str
) -> None:
    headers = {"x-api-key": api_key, "Idempotency-Key": "daily-report"}
    body = {"prompt": "daily report"}
    first = requests.post(f"{api_server}/v1/jobs", json=body, headers=headers, timeout=10)
    with session_scope(database_url) as session:
        job = session.get(Job, first.json()["id"])
        assert job is not None
        job.created_at = utcnow() - timedelta(hours=25)
    again = requests.post(f"{api_server}/v1/jobs", json=body, headers=headers, timeout=10)
    assert again.status_code == 202
    assert again.json()["id"] != first.json()["id"]
    assert jobs_with_key(database_url, "daily-report") == 1  # the old job let the key go
