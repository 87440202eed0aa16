"""GET /metrics: the exposition adds up what the jobs, attempts and deliveries recorded.

Jobs run through the real worker against the simulator. The test database is shared by the
whole session, so figures are read for a model name of this test's own (priced and limited
like any claude-sonnet-4-5 model), and the webhook figures, which have no model, as deltas.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import auth, unique, wait_for_status
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from promptq.config import Settings
from promptq.db import session_scope
from promptq.jobs.repository import JobRepository
from promptq.metrics import LATENCY_BUCKETS_SECONDS
from promptq.testing import FINAL

TOKEN_FIELDS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_write": "cache_creation_input_tokens",
    "cache_read": "cache_read_input_tokens",
}
# Every label promptq may put on a metric: nothing that names a key, a URL or a prompt.
ALLOWED_LABELS = {"model", "status", "kind", "outcome", "status_code", "le"}


class Exposition:
    """A parsed /metrics page."""

    def __init__(self, body: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(body)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    def find(self, name: str, **labels: str) -> list[Sample]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, *, default: float | None = None, **labels: str) -> float:
        found = self.find(name, **labels)
        if not found:
            if default is not None:
                return default
            raise AssertionError(f"no sample {name} {labels}")
        assert len(found) == 1, found
        return found[0].value


def scrape(client: Any) -> Exposition:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Exposition(response.text)


class Hook:
    """A webhook receiver that answers every delivery with one status."""

    def __init__(self, status: int) -> None:
        self.hits = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                hook.hits += 1
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def hooks() -> Iterator[tuple[Hook, Hook]]:
    ok, gone = Hook(200), Hook(410)
    yield ok, gone
    ok.server.shutdown()
    gone.server.shutdown()


def wait_for_deliveries(client: Any, key: str, job_id: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = client.get(f"/v1/jobs/{job_id}/deliveries", headers=auth(key)).json()["data"]
        if data and all(d["status"] != "pending" for d in data):
            return
        time.sleep(0.05)
    raise AssertionError(f"the deliveries of {job_id} never settled")


def test_metrics_add_up_the_jobs_attempts_and_deliveries(
    client: Any,
    api_key: str,
    database_url: str,
    worker_process: Any,
    hooks: tuple[Hook, Hook],
) -> None:
    ok_hook, gone_hook = hooks
    model = f"claude-sonnet-4-5-metrics-{uuid.uuid4().hex[:8]}"
    before = scrape(client)
    assert not before.find("promptq_jobs", model=model)

    bodies = [
        {"prompt": unique("count me"), "webhook_url": ok_hook.url},
        {"prompt": unique("count me too")},
        # Refused at once: a failed job, a permanent attempt, a job.failed event answered 410.
        {"prompt": unique("[[sim:400]] refuse me"), "webhook_url": gone_hook.url},
        # Rate limited once, then answered: a 429 attempt and a 200 one.
        {"prompt": unique("[[sim:429 x1]] slow down")},
    ]
    submitted = []
    for body in bodies:
        response = client.post("/v1/jobs", json={**body, "model": model}, headers=auth(api_key))
        assert response.status_code == 202, response.text
        submitted.append(response.json()["id"])
    jobs = [wait_for_status(client, api_key, job_id, FINAL, timeout=30) for job_id in submitted]
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded", "failed", "succeeded"]
    wait_for_deliveries(client, api_key, jobs[0]["id"])
    wait_for_deliveries(client, api_key, jobs[2]["id"])
    assert ok_hook.hits == 1 and gone_hook.hits == 1

    # A job's end is recorded before its rate-limit slot is given back: wait for that too.
    deadline = time.monotonic() + 10
    after = scrape(client)
    while after.value("promptq_limiter_in_flight", model=model) and time.monotonic() < deadline:
        time.sleep(0.1)
        after = scrape(client)

    # Jobs by status, and nothing left waiting.
    expected = {"succeeded": 3, "failed": 1, "queued": 0, "running": 0, "retrying": 0}
    for status, count in expected.items():
        assert after.value("promptq_jobs", model=model, status=status) == count, status
    assert after.value("promptq_jobs_created_total", model=model) == 4
    assert after.value("promptq_queue_depth", model=model) == 0
    assert after.value("promptq_queue_oldest_age_seconds", model=model) == 0
    assert after.value("promptq_limiter_waiting_jobs", model=model) == 0
    assert after.value("promptq_limiter_in_flight", model=model) == 0
    assert after.value("promptq_limiter_paused_seconds", model=model) >= 0
    assert after.value("promptq_broker_backlog_messages") >= 0

    # Tokens and dollars: the sums of what the jobs themselves report.
    for kind, field in TOKEN_FIELDS.items():
        recorded = sum((job["usage"] or {}).get(field, 0) for job in jobs)
        assert after.value("promptq_tokens_total", model=model, kind=kind) == recorded, kind
    assert after.value("promptq_tokens_total", model=model, kind="input") > 0
    cost = sum(Decimal(job["cost"]["total"]) for job in jobs if job["cost"])
    assert cost > 0
    assert after.value("promptq_cost_usd_total", model=model) == pytest.approx(float(cost))

    # Upstream calls by outcome and status code, and the 429s.
    calls = {
        (s.labels["outcome"], s.labels["status_code"]): s.value
        for s in after.find("promptq_upstream_attempts_total", model=model)
    }
    assert calls == {("succeeded", "200"): 3, ("permanent", "400"): 1, ("transient", "429"): 1}
    assert after.value("promptq_upstream_rate_limited_total", model=model) >= 1

    # The latency histogram: cumulative buckets that match the recorded latencies exactly.
    with session_scope(database_url) as session:
        repository = JobRepository(session)
        latencies = [a.latency_ms for job in jobs for a in repository.attempts_for(job["id"])]
    assert len(latencies) == 5
    buckets = after.find("promptq_upstream_latency_seconds_bucket", model=model)
    by_bound = {float(s.labels["le"]): s.value for s in buckets}
    assert list(by_bound) == [*LATENCY_BUCKETS_SECONDS, float("inf")]
    counts = list(by_bound.values())
    assert counts == sorted(counts), "buckets must be cumulative"
    for bound, bucket in by_bound.items():
        assert bucket == sum(1 for ms in latencies if ms <= bound * 1000), bound
    assert after.value("promptq_upstream_latency_seconds_count", model=model) == len(latencies)
    assert by_bound[float("inf")] == len(latencies)
    assert after.value("promptq_upstream_latency_seconds_sum", model=model) == pytest.approx(
        sum(latencies) / 1000
    )

    # Webhooks (no model label): at least this test's delivery of each kind was added.
    def delta(name: str, **labels: str) -> float:
        return after.value(name, default=None, **labels) - before.value(name, default=0.0, **labels)

    assert delta("promptq_webhook_deliveries", status="succeeded") >= 1
    assert delta("promptq_webhook_deliveries", status="failed") >= 1
    assert delta("promptq_webhook_attempts_total", outcome="succeeded") >= 1
    assert delta("promptq_webhook_attempts_total", outcome="http_error") >= 1
    assert after.value("promptq_metrics_scrape_duration_seconds") > 0


def test_metrics_need_no_key_and_show_none(client: Any, api_key: str) -> None:
    response = client.get("/metrics")  # no Authorization header: the Prometheus convention
    assert response.status_code == 200
    exposition = Exposition(response.text)
    assert exposition.families
    assert all(name.startswith("promptq_") for name in exposition.families)
    labels = {label for sample in exposition.samples for label in sample.labels}
    assert labels <= ALLOWED_LABELS, labels - ALLOWED_LABELS
    assert api_key not in response.text and "pq_" not in response.text


def test_histogram_is_a_proper_family(client: Any) -> None:
    exposition = scrape(client)
    family = exposition.families["promptq_upstream_latency_seconds"]
    assert family.type == "histogram"
    assert exposition.families["promptq_upstream_attempts"].type == "counter"
    assert exposition.families["promptq_jobs"].type == "gauge"


def test_a_database_outage_is_a_503(settings: Settings, tmp_path: Path) -> None:
    unreachable = f"sqlite:///{tmp_path / 'no-such-directory' / 'promptq.db'}"
    response = _scrape_with(settings.model_copy(update={"database_url": unreachable}))
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable"
    assert "database" in response.json()["error"]["message"]


def test_a_redis_outage_is_a_503(settings: Settings) -> None:
    response = _scrape_with(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable"
    assert "Redis" in response.json()["error"]["message"]


def _scrape_with(settings: Settings) -> Any:
    from api.app import create_app

    with TestClient(create_app(settings)) as test_client:
        return test_client.get("/metrics")


def _collect(database_url: str, max_models: int) -> Exposition:
    from prometheus_client import CollectorRegistry, generate_latest

    from promptq.metrics import PromptqCollector

    registry = CollectorRegistry()
    registry.register(PromptqCollector(database_url, None, max_models=max_models))
    return Exposition(generate_latest(registry).decode())


def test_model_labels_are_bounded_and_the_rest_fold_into_other(
    client: Any, api_key: str, database_url: str, worker_process: Any
) -> None:
    """A client may name any model: past max_models distinct names, the later ones are
    summed under `other`, and no figure is lost on the way."""
    tag = uuid.uuid4().hex[:8]
    submitted = []
    for index in range(3):
        body = {"prompt": unique("many models"), "model": f"claude-sonnet-4-5-fold-{tag}-{index}"}
        response = client.post("/v1/jobs", json=body, headers=auth(api_key))
        assert response.status_code == 202, response.text
        submitted.append(response.json()["id"])
    for job_id in submitted:
        wait_for_status(client, api_key, job_id, FINAL, timeout=30)

    wide, narrow = _collect(database_url, 10_000), _collect(database_url, 2)
    wide_models = {s.labels["model"] for s in wide.find("promptq_jobs_created_total")}
    narrow_models = {s.labels["model"] for s in narrow.find("promptq_jobs_created_total")}
    assert len(wide_models) >= 3 and "other" not in wide_models
    # Two names keep their labels, every other model is summed under `other`.
    assert len(narrow_models) == 3 and "other" in narrow_models
    assert narrow_models - {"other"} < wide_models
    for name in (
        "promptq_jobs_created_total",
        "promptq_tokens_total",
        "promptq_cost_usd_total",
        "promptq_upstream_attempts_total",
        "promptq_upstream_latency_seconds_count",
    ):
        assert sum(s.value for s in narrow.find(name)) == pytest.approx(
            sum(s.value for s in wide.find(name))
        ), name


def test_a_metrics_token_is_required_once_set(settings: Settings) -> None:
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from api.app import create_app

    token = "metrics-" + "x" * 40
    configured = settings.model_copy(update={"metrics_token": SecretStr(token)})
    with TestClient(create_app(configured)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "nope"}):
            refused = client.get("/metrics", headers=headers)
            assert refused.status_code == 401
            assert "PROMPTQ_METRICS_TOKEN" in refused.json()["error"]["message"]
            assert refused.headers["www-authenticate"] == "Bearer"
        scraped = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert scraped.status_code == 200 and "promptq_" in scraped.text


def test_the_broker_backlog_counts_every_priority_list(
    quiet_api: Any, quiet_env: dict[str, str], api_key: str
) -> None:
    """deploy/k8s/keda.yaml scales the workers on this gauge: a job of any priority waiting
    in the broker counts, whichever of the broker's lists holds it. On the quiet Redis no
    worker takes them."""
    import redis

    from promptq.broker.celery_app import QUEUE
    from promptq.priority import Priority

    client = quiet_api()
    for priority in Priority:
        body = {"prompt": unique("wait for a worker"), "priority": str(priority)}
        response = client.post("/v1/jobs", json=body, headers=auth(api_key))
        assert response.status_code == 202, response.text

    broker = redis.Redis.from_url(quiet_env["PROMPTQ_REDIS_URL"])
    lists = [n for n in broker.keys(f"{QUEUE}*") if broker.type(n) == b"list"]
    # One list per priority (high, normal, low), a message in each.
    assert {name.decode(): broker.llen(name) for name in lists} == {
        QUEUE: 1,
        f"{QUEUE}:3": 1,
        f"{QUEUE}:6": 1,
    }
    assert scrape(client).value("promptq_broker_backlog_messages") == len(Priority)
