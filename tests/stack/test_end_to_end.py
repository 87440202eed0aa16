"""The whole path: the API, a real Celery worker process, the simulator over HTTP, the
database. Faults come from per-prompt simulator directives, so tests don't interfere."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from helpers import auth, unique, wait_for_status

from promptq.db import session_scope
from promptq.jobs import service
from promptq.jobs.repository import JobRepository
from promptq.jobspec.schemas import JobCreate
from promptq.keys.service import authenticate
from promptq.pricing import PriceTable, cost_of
from promptq.testing import FINAL
from promptq.usage import Usage


@pytest.fixture(autouse=True)
def _worker(worker_process: Any) -> None:
    """Every test here needs the worker process running."""


def calls_for(simulator: Any, prompt: str) -> int:
    return int(simulator.stats()["calls_by_prompt"].get(prompt[:60], 0))


def attempts_of(database_url: str, job_id: str) -> list[Any]:
    with session_scope(database_url) as session:
        return list(JobRepository(session).attempts_for(job_id))


def test_a_job_runs_and_records_result_usage_and_cost(
    client: Any, api_key: str, database_url: str, simulator: Any
) -> None:
    prompt = unique("What is the capital of France?")
    response = client.post(
        "/v1/jobs?wait=20",
        json={"prompt": prompt, "model": "claude-sonnet-4-6", "metadata": {"a": 1}},
        headers=auth(api_key),
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded"
    assert job["attempts"] == 1
    assert job["result"]["type"] == "message"
    assert job["output_text"] and job["output_text"] in job["result"]["content"][-1]["text"]
    assert job["metadata"] == {"a": 1}
    assert job["started_at"] and job["finished_at"] and job["error"] is None

    usage = Usage.from_message(job["result"])
    assert job["usage"] == usage.to_api()
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    prices = PriceTable.load(None).prices_for("claude-sonnet-4-6")
    assert prices is not None
    expected = cost_of(usage, prices)
    assert Decimal(job["cost"]["total"]) == expected.total
    assert Decimal(job["cost"]["input"]) == expected.input
    assert Decimal(job["cost"]["output"]) == expected.output
    assert job["cost"]["currency"] == "USD"
    assert job["prices"] == prices.to_dict()

    [attempt] = attempts_of(database_url, job["id"])
    assert attempt.status_code == 200
    assert attempt.outcome == "succeeded"
    assert attempt.upstream_request_id
    assert attempt.latency_ms >= 0
    assert calls_for(simulator, prompt) == 1


def test_thinking_and_cache_usage_are_priced(client: Any, api_key: str) -> None:
    system = [
        {
            "type": "text",
            # Unique per run: the simulator remembers cached prefixes for its lifetime.
            "text": unique("A long shared preamble. " * 40),
            "cache_control": {"type": "ephemeral"},
        }
    ]
    request = {
        "model": "claude-haiku-4-5",
        "max_tokens": 3000,
        "system": system,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": unique("Think about primes")}],
    }
    first = client.post("/v1/jobs?wait=20", json={"request": request}, headers=auth(api_key))
    second = client.post("/v1/jobs?wait=20", json={"request": request}, headers=auth(api_key))
    first_job, second_job = first.json(), second.json()
    assert first_job["status"] == second_job["status"] == "succeeded", (first_job, second_job)
    assert first_job["result"]["content"][0]["type"] == "thinking"
    assert first_job["usage"]["cache_creation_input_tokens"] > 0
    assert second_job["usage"]["cache_read_input_tokens"] > 0
    assert Decimal(first_job["cost"]["cache_write"]) > 0
    assert Decimal(second_job["cost"]["cache_read"]) > 0


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        ("429", 429),
        ("500", 500),
        ("502", 502),
        ("503", 503),
        ("504", 504),
        ("524", 524),
        ("529", 529),
        ("html", 502),
        ("empty", 200),
        ("drop", None),
        ("openai-500", 500),
    ],
)
def test_transient_failures_are_retried(
    client: Any, api_key: str, database_url: str, simulator: Any, fault: str, status: int | None
) -> None:
    prompt = unique(f"flaky [[sim:{fault} x2]]")
    job = client.post("/v1/jobs", json={"prompt": prompt}, headers=auth(api_key)).json()
    job = wait_for_status(client, api_key, job["id"], FINAL, timeout=30)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 3
    attempts = attempts_of(database_url, job["id"])
    assert [a.outcome for a in attempts] == ["transient", "transient", "succeeded"]
    assert [a.status_code for a in attempts[:2]] == [status, status]
    assert all(a.error_message for a in attempts[:2])
    assert calls_for(simulator, prompt) == 3


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        ("400", 400),
        ("401", 401),
        ("403", 403),
        ("404", 404),
        ("413", 413),
        ("openai-invalid", 500),
        ("redirect", 301),
    ],
)
def test_permanent_failures_fail_at_once(
    client: Any, api_key: str, simulator: Any, fault: str, status: int
) -> None:
    prompt = unique(f"doomed [[sim:{fault}]]")
    job = client.post("/v1/jobs", json={"prompt": prompt}, headers=auth(api_key)).json()
    job = wait_for_status(client, api_key, job["id"], FINAL)
    assert job["status"] == "failed"
    assert job["attempts"] == 1
    assert job["error"]["upstream_status"] == status
    assert job["error"]["message"]
    assert job["cost"] is None
    assert calls_for(simulator, prompt) == 1


def test_upstream_error_message_reaches_the_job(client: Any, api_key: str) -> None:
    # The simulator validates like the real upstream: an unknown model is its 404.
    job = client.post(
        "/v1/jobs?wait=20",
        json={"prompt": unique("hi"), "model": "gpt-nope"},
        headers=auth(api_key),
    ).json()
    assert job["status"] == "failed"
    assert job["error"]["type"] == "not_found_error"
    assert "gpt-nope" in job["error"]["message"]


def test_retries_stop_after_max_attempts(client: Any, api_key: str, simulator: Any) -> None:
    prompt = unique("always overloaded [[sim:529]]")
    job = client.post("/v1/jobs", json={"prompt": prompt}, headers=auth(api_key)).json()
    job = wait_for_status(client, api_key, job["id"], FINAL, timeout=30)
    assert job["status"] == "failed"
    assert job["attempts"] == 4  # PROMPTQ_MAX_ATTEMPTS in the tests
    assert job["error"]["upstream_status"] == 529
    assert "gave up after 4 attempts" in job["error"]["message"]
    assert calls_for(simulator, prompt) == 4


def _unpublished_job(database_url: str, settings: Any, key: str, prompt: str) -> str:
    with session_scope(database_url) as session:
        record = authenticate(session, key)
        assert record is not None
        return service.create_job(session, settings, record, JobCreate(prompt=prompt)).job.id


def test_a_canceled_job_never_reaches_the_upstream(
    client: Any, api_key: str, database_url: str, settings: Any, simulator: Any
) -> None:
    from promptq.broker.publish import publish_job
    from worker.app import app

    prompt = unique("never asked")
    job_id = _unpublished_job(database_url, settings, api_key, prompt)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(api_key)).status_code == 200
    publish_job(app, job_id)  # its message arrives after all
    control = client.post(
        "/v1/jobs?wait=20", json={"prompt": unique("after")}, headers=auth(api_key)
    ).json()
    assert control["status"] == "succeeded"  # the worker has had its chance
    assert calls_for(simulator, prompt) == 0
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(api_key)).json()["status"] == "canceled"


def test_a_job_delivered_many_times_runs_once(
    client: Any, api_key: str, database_url: str, settings: Any, simulator: Any
) -> None:
    from promptq.broker.publish import publish_job
    from worker.app import app

    prompt = unique("once only [[sim:latency=0.5]]")
    job_id = _unpublished_job(database_url, settings, api_key, prompt)
    for _ in range(5):
        publish_job(app, job_id)
    job = wait_for_status(client, api_key, job_id, FINAL)
    assert job["status"] == "succeeded"
    assert job["attempts"] == 1
    assert calls_for(simulator, prompt) == 1


def test_the_sweeper_publishes_lost_jobs_and_reclaims_dead_claims(
    client: Any, api_key: str, database_url: str, settings: Any
) -> None:
    import time
    from datetime import timedelta

    from promptq.clock import utcnow
    from promptq.models import Job
    from worker.tasks.sweeper import sweep

    lost = _unpublished_job(database_url, settings, api_key, unique("lost message"))
    orphan = _unpublished_job(database_url, settings, api_key, unique("orphaned claim"))
    with session_scope(database_url) as session:
        job = session.get(Job, orphan)
        assert job is not None
        job.status, job.attempts = "running", 1
        job.lease_expires_at = utcnow() - timedelta(seconds=1)
    time.sleep(settings.republish_after_seconds + 0.5)
    swept = sweep()
    assert swept["reclaimed"] >= 1 and swept["republished"] >= 1
    assert wait_for_status(client, api_key, lost, FINAL)["status"] == "succeeded"
    reclaimed = wait_for_status(client, api_key, orphan, FINAL)
    assert reclaimed["status"] == "succeeded"
    assert reclaimed["attempts"] == 2


def test_a_message_lost_with_its_marker_alive_is_published_again(
    client: Any, api_key: str, database_url: str, settings: Any
) -> None:
    import time

    from promptq.broker.publish import broker_backlog, mark_published
    from worker.app import app
    from worker.tasks.sweeper import sweep

    # As when a worker is killed between taking a message off the queue and recording it:
    # the marker says the message is in the broker, but it is nowhere.
    job_id = _unpublished_job(database_url, settings, api_key, unique("lost in a dying worker"))
    mark_published(app, [job_id])
    time.sleep(settings.republish_after_seconds + 0.5)
    assert broker_backlog(app) == 0
    assert sweep()["republished"] >= 1
    assert wait_for_status(client, api_key, job_id, FINAL)["status"] == "succeeded"


def test_a_sweeper_pass_folds_the_closed_hours_rollup_shards(
    api_key: str, database_url: str
) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import select

    from promptq import rollups
    from promptq.keys.service import authenticate
    from promptq.models import UsageHourly, UsageHourlyShard
    from worker.tasks.sweeper import sweep

    with session_scope(database_url) as session:
        key = authenticate(session, api_key)
        assert key is not None
        key_id = key.id
    hour = rollups.floor_hour(datetime.now(UTC)) - timedelta(hours=4)
    ended = rollups.EndedJob(key_id, "folded-model", "succeeded", hour + timedelta(minutes=1))
    for _ in range(30):
        with session_scope(database_url) as session:
            rollups.jobs_ended(session, [ended])

    def rows(table: Any) -> list[int]:
        with session_scope(database_url) as session:
            query = select(table.jobs).where(table.model == "folded-model")
            return list(session.scalars(query))

    assert len(rows(UsageHourlyShard)) > 1 and rows(UsageHourly) == []
    assert sweep()["hours_folded"] >= 1
    assert (rows(UsageHourlyShard), rows(UsageHourly)) == ([], [30])


def test_one_sweeper_pass_at_a_time(
    client: Any, api_key: str, database_url: str, settings: Any
) -> None:
    import time

    from promptq.redis_keys import SWEEP_LOCK
    from worker.context import worker_context
    from worker.tasks.sweeper import sweep

    job_id = _unpublished_job(database_url, settings, api_key, unique("swept once"))
    time.sleep(settings.republish_after_seconds + 0.5)
    # Another pass is running (beat's tick came while a pass that ran out of its budget
    # sent the next one): this one leaves everything to it.
    running = worker_context().limiter.client.lock(SWEEP_LOCK, timeout=30)
    assert running.acquire(blocking=False)
    try:
        assert sweep() == {"reclaimed": 0, "republished": 0, "deliveries": 0, "hours_folded": 0}
    finally:
        running.release()
    assert sweep()["republished"] >= 1
    assert wait_for_status(client, api_key, job_id, FINAL)["status"] == "succeeded"
