"""PostgreSQL or Redis away for a while: the API answers 503 with Retry-After and writes
nothing, a worker keeps an answer it already paid for, and everything resumes by itself
when they come back. The outage is a real one: the link through a TCP proxy is cut."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from helpers import auth, start_worker, stop_worker, wait_for_status
from netcut import CuttableProxy
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from promptq.config import Settings
from promptq.db import session_scope
from promptq.models import Job
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


def test_a_worker_keeps_a_paid_answer_through_a_database_outage(
    test_env: dict[str, str],
    database_proxy: CuttableProxy,
    database_url: str,
    client: Any,
    api_key: str,
    simulator: Any,
    tmp_path: Path,
) -> None:
    # A worker of its own, on its own Redis database, reaching the database via the proxy.
    redis_db = test_env["PROMPTQ_REDIS_URL"].rsplit("/", 1)[0] + "/4"
    env = {
        **test_env,
        "PROMPTQ_DATABASE_URL": through(database_proxy, database_url),
        "PROMPTQ_REDIS_URL": redis_db,
    }
    settings = Settings(database_url=database_url, redis_url=redis_db)
    worker = start_worker(env, tmp_path / "worker.log", concurrency=4)
    try:
        with api_client(settings) as own_client:
            prompt = f"{uuid.uuid4().hex} slow answer [[sim:latency=2]]"
            job_id = own_client.post(
                "/v1/jobs", json={"prompt": prompt}, headers=auth(api_key)
            ).json()["id"]
            wait_for_status(own_client, api_key, job_id, {"running"})
            database_proxy.cut()  # the answer arrives while the database is away
            time.sleep(4)
            database_proxy.restore()
            job = wait_for_status(own_client, api_key, job_id, FINAL, timeout=40)
    finally:
        stop_worker(worker)
    assert job["status"] == "succeeded"
    assert job["attempts"] == 1
    assert simulator.stats()["calls_by_prompt"][prompt[:60]] == 1
