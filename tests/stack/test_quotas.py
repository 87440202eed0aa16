"""Per-key quotas: what one key may make or hold. Each refusal is a 429 (a 503 for the
process-wide cap) with Retry-After and a message naming the quota's setting; nothing is
made by a refused request.

An in-process API on a Redis database of its own with no worker, so jobs stay unfinished
for as long as a test needs, and quotas set low per test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import auth, key_id_of, record_redis_trips, running_api

from promptq import redis_keys
from promptq.db import session_scope
from promptq.models import Job
from promptq.webhooks import deliveries

MakeClient = Callable[..., Any]


def refused(response: Any, status: int, setting: str) -> None:
    assert response.status_code == status, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert setting in response.json()["error"]["message"]


def test_unfinished_jobs_per_key(quiet_api: MakeClient, make_key: Any) -> None:
    client = quiet_api(key_max_unfinished_jobs=3)
    key, other = make_key("busy"), make_key("other")
    for i in range(3):
        assert (
            client.post("/v1/jobs", json={"prompt": f"q {i}"}, headers=auth(key)).status_code == 202
        )
    refused(
        client.post("/v1/jobs", json={"prompt": "one more"}, headers=auth(key)),
        429,
        "PROMPTQ_KEY_MAX_UNFINISHED_JOBS",
    )
    # A batch counts each of its requests; another key is not affected.
    batch = {
        "requests": [
            {
                "custom_id": f"r{i}",
                "params": {
                    "model": "claude-sonnet-4-6",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            }
            for i in range(4)
        ]
    }
    refused(
        client.post("/v1/messages/batches", json=batch, headers=auth(other)),
        429,
        "PROMPTQ_KEY_MAX_UNFINISHED_JOBS",
    )
    assert client.post("/v1/jobs", json={"prompt": "mine"}, headers=auth(other)).status_code == 202
    assert len(client.get("/v1/jobs", headers=auth(key)).json()["data"]) == 3


def test_unfinished_jobs_counted_in_redis_stay_exact(quiet_api: MakeClient, make_key: Any) -> None:
    """Intake keeps the count in Redis and adds to it; it only grows, so a finished job's
    room is found by the database's count once the Redis count reaches the quota, and a
    count wiped from Redis is counted again, never taken for zero."""
    client = quiet_api(key_max_unfinished_jobs=2)
    key = make_key("counted")
    ids = [
        client.post("/v1/jobs", json={"prompt": f"q {i}"}, headers=auth(key)).json()["id"]
        for i in range(2)
    ]
    refused(
        client.post("/v1/jobs", json={"prompt": "third"}, headers=auth(key)),
        429,
        "PROMPTQ_KEY_MAX_UNFINISHED_JOBS",
    )
    assert client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(key)).status_code == 200
    assert client.post("/v1/jobs", json={"prompt": "room"}, headers=auth(key)).status_code == 202
    redis = client.app.state.unfinished.client
    counts = list(redis.scan_iter(redis_keys.unfinished_jobs("*")))
    assert counts, "intake keeps no count in Redis"
    redis.delete(*counts)
    refused(
        client.post("/v1/jobs", json={"prompt": "after a wipe"}, headers=auth(key)),
        429,
        "PROMPTQ_KEY_MAX_UNFINISHED_JOBS",
    )
    assert len(client.get("/v1/jobs", headers=auth(key)).json()["data"]) == 3


def naming(text: str) -> Callable[[Any], bool]:
    """Whether a packed Redis request names `text` (a key's id, in its quota keys)."""
    needle = text.encode()

    def names(command: Any) -> bool:
        chunks = command if isinstance(command, list | tuple) else [command]
        return any(needle in bytes(chunk) for chunk in chunks)

    return names


def test_a_jobs_rate_and_its_room_are_taken_in_one_round_trip(
    quiet_api: MakeClient, make_key: Any, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's intake takes the key's intake rate and its room in the unfinished count with
    one script (promptq.quotas.IntakeQuotas). A request refused or answered after that
    (here an idempotency key's earlier job) has added to the count all the same: the count
    reaches the quota sooner, and the database's count then keeps the quota exact."""
    client = quiet_api(key_max_unfinished_jobs=3)
    key = make_key("one trip")
    key_id = key_id_of(database_url, key)
    first = client.post("/v1/jobs", json={"prompt": "first"}, headers=auth(key))
    assert first.status_code == 202  # no count yet: counted in the database, then kept
    trips: list[list[str]] = []
    stop_recording = record_redis_trips(monkeypatch, naming(key_id), trips)
    second = client.post(
        "/v1/jobs", json={"prompt": "second"}, headers={**auth(key), "Idempotency-Key": "k"}
    )
    stop_recording()
    assert second.status_code == 202
    assert trips == [["EVALSHA"]], trips
    counts = client.app.state.unfinished.client
    assert int(counts.get(redis_keys.unfinished_jobs(key_id))) == 2
    # The same request again: the earlier job, and one more in the count (3 for 2 jobs).
    again = client.post(
        "/v1/jobs", json={"prompt": "second"}, headers={**auth(key), "Idempotency-Key": "k"}
    )
    assert again.json()["id"] == second.json()["id"]
    assert int(counts.get(redis_keys.unfinished_jobs(key_id))) == 3
    # The count is at the quota, the jobs are not: counted in the database, taken in.
    assert client.post("/v1/jobs", json={"prompt": "third"}, headers=auth(key)).status_code == 202
    refused(
        client.post("/v1/jobs", json={"prompt": "fourth"}, headers=auth(key)),
        429,
        "PROMPTQ_KEY_MAX_UNFINISHED_JOBS",
    )


def test_a_request_past_its_rate_takes_no_room(
    quiet_api: MakeClient, make_key: Any, database_url: str
) -> None:
    client = quiet_api(key_max_requests_per_second=1, key_max_unfinished_jobs=10)
    key = make_key("past its rate")
    count = redis_keys.unfinished_jobs(key_id_of(database_url, key))
    statuses = [
        client.post("/v1/jobs", json={"prompt": f"fast {i}"}, headers=auth(key)).status_code
        for i in range(5)
    ]
    # Two seconds of the rate at once: two taken in, the rest refused without a count.
    assert statuses.count(202) == int(client.app.state.unfinished.client.get(count)), statuses
    assert 429 in statuses


def test_subscriptions_and_templates_per_key(quiet_api: MakeClient, make_key: Any) -> None:
    client = quiet_api(key_max_subscriptions=2, key_max_templates=1)
    key = make_key("collector")
    for i in range(2):
        hook = {"url": f"http://127.0.0.1:9/hook/{i}"}
        assert client.post("/v1/webhooks", json=hook, headers=auth(key)).status_code == 201
    refused(
        client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/x"}, headers=auth(key)),
        429,
        "PROMPTQ_KEY_MAX_SUBSCRIPTIONS",
    )
    template = {"name": "t1", "prompt": "Hello {{ name }}"}
    assert client.post("/v1/templates", json=template, headers=auth(key)).status_code == 201
    refused(
        client.post("/v1/templates", json={**template, "name": "t2"}, headers=auth(key)),
        429,
        "PROMPTQ_KEY_MAX_TEMPLATES",
    )


def test_intake_requests_per_second_per_key(quiet_api: MakeClient, make_key: Any) -> None:
    client = quiet_api(key_max_requests_per_second=1)
    key, other = make_key("hasty"), make_key("calm")
    statuses = [
        client.post("/v1/jobs", json={"prompt": f"fast {i}"}, headers=auth(key)).status_code
        for i in range(6)
    ]
    # One a second, two seconds of it at once: two go, then the key must slow down.
    assert statuses[:2] == [202] * 2 and 429 in statuses[2:]
    # The rate refills as time passes, so on a slow machine a request may find the second's
    # place free again: each check below takes the first refusal of a few tries.
    refused(
        first_refusal(lambda: client.post("/v1/jobs", json={"prompt": "again"}, headers=auth(key))),
        429,
        "PROMPTQ_KEY_MAX_REQUESTS_PER_SECOND",
    )
    # The SDK's path answers in Anthropic's shape, which the SDK retries after Retry-After.
    message = first_refusal(
        lambda: client.post(
            "/v1/messages",
            json={
                "model": "claude-sonnet-4-6",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
            },
            headers=auth(key),
        )
    )
    assert message.status_code == 429
    assert message.json()["type"] == "error"
    assert message.json()["error"]["type"] == "rate_limit_error"
    assert client.post("/v1/jobs", json={"prompt": "mine"}, headers=auth(other)).status_code == 202


def first_refusal(send: Callable[[], Any], tries: int = 5) -> Any:
    """The first answer of `send` that is a 429, else the last one."""
    for _ in range(tries):
        response = send()
        if response.status_code == 429:
            break
    return response


def test_redeliveries_per_minute_per_key(
    quiet_api: MakeClient, make_key: Any, quiet_env: dict[str, str]
) -> None:
    client = quiet_api(key_max_redeliveries_per_minute=1)
    key = make_key("redeliverer")
    job_id = client.post(
        "/v1/jobs",
        json={"prompt": "done", "webhook_url": "http://127.0.0.1:9/hook"},
        headers=auth(key),
    ).json()["id"]
    with session_scope(quiet_env["PROMPTQ_DATABASE_URL"]) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = "succeeded"
        deliveries.job_event(session, job)
    assert client.post(f"/v1/jobs/{job_id}/redeliver", headers=auth(key)).status_code == 202
    refused(
        client.post(f"/v1/jobs/{job_id}/redeliver", headers=auth(key)),
        429,
        "PROMPTQ_KEY_MAX_REDELIVERIES_PER_MINUTE",
    )


def test_requests_held_open_per_key_and_per_process(
    quiet_env: dict[str, str], tmp_path: Path, make_key: Any
) -> None:
    env = {**quiet_env, "PROMPTQ_KEY_MAX_OPEN_REQUESTS": "1", "PROMPTQ_MAX_OPEN_REQUESTS": "2"}
    first, second, third = make_key("waiter-1"), make_key("waiter-2"), make_key("waiter-3")
    with running_api(env, tmp_path / "api.log") as url:

        def hold(key: str) -> None:
            # No worker: the job stays queued and the request is held for its 3 seconds.
            requests.post(
                f"{url}/v1/jobs?wait=3", json={"prompt": "wait"}, headers=auth(key), timeout=10
            )

        holders = [threading.Thread(target=hold, args=(k,)) for k in (first, second)]
        for thread in holders:
            thread.start()
        time.sleep(1.0)
        same_key = requests.post(
            f"{url}/v1/jobs?wait=3", json={"prompt": "again"}, headers=auth(first), timeout=10
        )
        full = requests.post(
            f"{url}/v1/jobs?wait=3", json={"prompt": "third"}, headers=auth(third), timeout=10
        )
        # Without ?wait a key is never refused for this.
        quick = requests.post(
            f"{url}/v1/jobs", json={"prompt": "no wait"}, headers=auth(first), timeout=10
        )
        for thread in holders:
            thread.join()
        after = requests.post(
            f"{url}/v1/jobs?wait=1", json={"prompt": "later"}, headers=auth(first), timeout=10
        )
    refused(same_key, 429, "PROMPTQ_KEY_MAX_OPEN_REQUESTS")
    refused(full, 503, "PROMPTQ_MAX_OPEN_REQUESTS")
    assert quick.status_code == 202
    assert after.status_code == 202  # held again once the others let go
