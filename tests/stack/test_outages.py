"""PostgreSQL or Redis away for a while: the API answers 503 with Retry-After and writes
nothing, a worker keeps an answer it already paid for and a webhook receiver's answer, and
everything resumes by itself when they come back. The outage is a real one: the link
through a TCP proxy is cut."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from helpers import Receiver, auth, start_worker, stop_worker, wait_for_status
from netcut import CuttableProxy
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from promptq.config import Settings
from promptq.db import session_scope
from promptq.models import Job, WebhookAttempt, WebhookDelivery
from promptq.supervisor import Child
from promptq.testing import FINAL


def through(proxy: CuttableProxy, url: str) -> str:
    """The same URL, by way of the proxy."""
    if url.startswith("redis"):
        return urlsplit(url)._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
    return (
        make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    )


def proxy_for(url: str) -> CuttableProxy:
    if url.startswith("redis"):
        parts = urlsplit(url)
        return CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    parsed = make_url(url)
    return CuttableProxy(parsed.host or "127.0.0.1", parsed.port or 5432)


def job_count(database_url: str) -> int:
    with session_scope(database_url) as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def api_client(settings: Settings) -> Any:
    from fastapi.testclient import TestClient

    from api.app import create_app

    return TestClient(create_app(settings))


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[CuttableProxy]:
    proxy = proxy_for(redis_url)
    yield proxy
    proxy.stop()


def test_redis_away_means_503_and_nothing_written(
    settings: Settings,
    redis_proxy: CuttableProxy,
    api_key: str,
    database_url: str,
    worker_process: Any,
) -> None:
    cut_settings = settings.model_copy(
        update={"redis_url": through(redis_proxy, settings.redis_url or "")}
    )
    with api_client(cut_settings) as client:
        assert (
            client.post("/v1/jobs", json={"prompt": "before"}, headers=auth(api_key)).status_code
            == 202
        )
        redis_proxy.cut()
        time.sleep(1.1)  # the API asks the broker at most once a second
        before = job_count(database_url)
        response = client.post("/v1/jobs", json={"prompt": "during"}, headers=auth(api_key))
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert "Redis" in response.json()["error"]["message"]
        assert job_count(database_url) == before  # nothing half-written
        assert client.get("/readyz").status_code == 503
        assert client.get("/v1/jobs", headers=auth(api_key)).status_code == 200  # reads work

        redis_proxy.restore()
        deadline = time.monotonic() + 10
        while True:
            response = client.post(
                "/v1/jobs", json={"prompt": "after " + uuid.uuid4().hex}, headers=auth(api_key)
            )
            if response.status_code == 202 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert response.status_code == 202
        job = wait_for_status(client, api_key, response.json()["id"], FINAL)
        assert job["status"] == "succeeded"


@pytest.fixture
def database_proxy(database_url: str) -> Iterator[CuttableProxy]:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite is a file: there is no server to lose")
    proxy = proxy_for(database_url)
    yield proxy
    proxy.stop()


def test_database_away_means_503_then_it_resumes_without_restart(
    settings: Settings,
    database_proxy: CuttableProxy,
    api_key: str,
    database_url: str,
    worker_process: Any,
) -> None:
    cut_settings = settings.model_copy(
        update={"database_url": through(database_proxy, database_url)}
    )
    with api_client(cut_settings) as client:
        assert client.get("/v1/jobs", headers=auth(api_key)).status_code == 200
        database_proxy.cut()
        for response in (
            client.get("/v1/jobs", headers=auth(api_key)),
            client.post("/v1/jobs", json={"prompt": "during"}, headers=auth(api_key)),
        ):
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "5"
            assert "database" in response.json()["error"]["message"]
        assert client.get("/readyz").status_code == 503

        database_proxy.restore()
        response = client.post("/v1/jobs?wait=20", json={"prompt": "after"}, headers=auth(api_key))
        assert response.status_code == 200
        assert response.json()["status"] == "succeeded"


@contextmanager
def proxied_worker(
    test_env: dict[str, str], database_proxy: CuttableProxy, database_url: str, tmp_path: Path
) -> Iterator[tuple[Child, Settings]]:
    """A worker of its own, on its own Redis database, reaching the database via the proxy;
    and the settings of a client beside it (the database direct, the worker's Redis)."""
    redis_db = test_env["PROMPTQ_REDIS_URL"].rsplit("/", 1)[0] + "/4"
    env = {
        **test_env,
        "PROMPTQ_DATABASE_URL": through(database_proxy, database_url),
        "PROMPTQ_REDIS_URL": redis_db,
    }
    worker = start_worker(env, tmp_path / "worker.log", concurrency=4)
    try:
        yield worker, Settings(database_url=database_url, redis_url=redis_db)
    finally:
        stop_worker(worker)


def test_a_worker_keeps_a_paid_answer_through_a_database_outage(
    test_env: dict[str, str],
    database_proxy: CuttableProxy,
    database_url: str,
    client: Any,
    api_key: str,
    simulator: Any,
    tmp_path: Path,
) -> None:
    with (
        proxied_worker(test_env, database_proxy, database_url, tmp_path) as (_, settings),
        api_client(settings) as own_client,
    ):
        prompt = f"{uuid.uuid4().hex} slow answer [[sim:latency=2]]"
        response = own_client.post("/v1/jobs", json={"prompt": prompt}, headers=auth(api_key))
        job_id = response.json()["id"]
        wait_for_status(own_client, api_key, job_id, {"running"})
        database_proxy.cut()  # the answer arrives while the database is away
        time.sleep(4)
        database_proxy.restore()
        job = wait_for_status(own_client, api_key, job_id, FINAL, timeout=40)
    assert job["status"] == "succeeded"
    assert job["attempts"] == 1
    assert simulator.stats()["calls_by_prompt"][prompt[:60]] == 1


def test_a_webhook_answered_while_the_database_is_away_is_recorded_not_sent_again(
    test_env: dict[str, str],
    database_proxy: CuttableProxy,
    database_url: str,
    api_key: str,
    slow_receiver: Receiver,
    tmp_path: Path,
) -> None:
    # The receiver holds the POST for two seconds: it answers while the database is away,
    # and the worker must keep that answer until it can record it. Dropped, the delivery
    # would stay claimed and be POSTed a second time once its lease ran out.
    with (
        proxied_worker(test_env, database_proxy, database_url, tmp_path) as (worker, settings),
        api_client(settings) as own_client,
    ):
        job_id = own_client.post(
            "/v1/jobs",
            json={"prompt": f"{uuid.uuid4().hex} notify me", "webhook_url": slow_receiver.url},
            headers=auth(api_key),
        ).json()["id"]
        slow_receiver.wait_for(1)  # the POST is in flight
        database_proxy.cut()
        time.sleep(4)
        database_proxy.restore()
        deadline = time.monotonic() + 40
        while delivery_of(database_url, job_id) != "succeeded":
            assert time.monotonic() < deadline, worker.log_text()
            time.sleep(0.2)
    assert len(slow_receiver.requests) == 1
    with session_scope(database_url) as session:
        attempts = session.scalars(
            select(WebhookAttempt.status_code)
            .join(WebhookDelivery, WebhookDelivery.id == WebhookAttempt.delivery_id)
            .where(WebhookDelivery.job_id == job_id)
        ).all()
    assert list(attempts) == [200]


def delivery_of(database_url: str, job_id: str) -> str | None:
    """The status of the job's own webhook delivery, None before it exists."""
    with session_scope(database_url) as session:
        return session.scalars(
            select(WebhookDelivery.status).where(WebhookDelivery.job_id == job_id)
        ).one_or_none()
