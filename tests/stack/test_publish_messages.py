"""What a job's message on the broker shows of its arguments (Flower's "args"): promptq
gives Celery the representation rather than have it build one per message, and it must
be the one Celery would have built, for a job alone, a job with a grant, and a batch's.
And jobs published together (an intake batch's): one Redis round trip, each job at its
own priority."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import redis
from celery.utils.saferepr import saferepr
from helpers import record_redis_trips

from promptq.broker.celery_app import QUEUE, create_celery
from promptq.broker.publish import publish_each, publish_job, publish_jobs
from promptq.config import Settings
from promptq.ratelimit.protocol import Grant


def _settings(quiet_env: dict[str, str]) -> Settings:
    return Settings(
        database_url="sqlite:///unused.db",
        redis_url=quiet_env["PROMPTQ_REDIS_URL"],
        upstream_url="http://127.0.0.1:9",
        upstream_api_key=quiet_env["PROMPTQ_UPSTREAM_API_KEY"],
    )


def test_a_message_shows_its_arguments_as_celery_would(quiet_env: dict[str, str]) -> None:
    settings = _settings(quiet_env)
    app = create_celery(settings)
    grant = Grant(id="slot_1", model="claude-sonnet-4-5", input_tokens=1200, output_tokens=64)
    publish_job(app, "job_alone", "low")
    publish_job(app, "job_granted", "high", grant=grant)
    publish_jobs(app, ["job_batch_1", "job_batch_2"], "normal")

    shown = {args[0]: headers for _, args, headers in _messages(settings.redis_url)}
    assert set(shown) == {"job_alone", "job_granted", "job_batch_1", "job_batch_2"}
    for job_id, headers in shown.items():
        args = [job_id, grant.to_message()] if job_id == "job_granted" else [job_id]
        assert headers["argsrepr"] == saferepr(args)
        assert headers["kwargsrepr"] == saferepr({})


def test_jobs_published_together_take_one_round_trip_each_at_its_priority(
    quiet_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(quiet_env)
    app = create_celery(settings)
    publish_job(app, "job_first", "normal")  # the connection's handshake, not counted
    trips: list[list[str]] = []
    record_redis_trips(monkeypatch, lambda _: True, trips)
    publish_each(app, [("job_t1", "high"), ("job_t2", "low"), ("job_t3", "normal")])
    # The messages and their markers, in one pipeline.
    assert trips == [["LPUSH"] * 3 + ["SET"] * 3]

    queues = {args[0]: name for name, args, _ in _messages(settings.redis_url)}
    assert set(queues) >= {"job_t1", "job_t2", "job_t3"}
    assert queues["job_t3"] == queues["job_first"]
    assert len({queues["job_t1"], queues["job_t2"], queues["job_t3"]}) == 3


def _messages(redis_url: str) -> list[tuple[str, list[Any], dict[str, Any]]]:
    """Every job message waiting on the broker: its list's name, its arguments and its
    headers."""
    client = redis.Redis.from_url(redis_url)
    found = []
    for name in client.scan_iter(match=f"{QUEUE}*"):
        if client.type(name) != b"list":
            continue
        for raw in client.lrange(name, 0, -1):
            message = json.loads(raw)
            body = json.loads(base64.b64decode(message["body"]))
            found.append((name.decode(), body[0], message["headers"]))
    return found
