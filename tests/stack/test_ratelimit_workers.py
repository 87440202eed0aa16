"""Global rate limits with several real worker processes against a simulator that enforces
its own limits: the limit holds across processes, slots of a killed worker free
themselves, a 429 pauses everyone, a slow model does not block a fast one, priorities
order the queue, and a limit set too high comes down by itself.

This module runs on a Redis database of its own, with its own workers, simulator and
limits, so the session's generous worker never takes its jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import REPO, auth, start_worker, stop_worker, wait_for_status

from promptq.config import Settings
from promptq.db import session_scope
from promptq.jobs.repository import JobRepository
from promptq.simulator import Simulator
from promptq.testing import FINAL

UNLIMITED = """
input_tpm = "unlimited"
output_tpm = "unlimited"
"""
LIMITS = f"""
[models."claude-hold-*"]
rpm = 240
max_concurrency = 100
burst_seconds = 0.25
{UNLIMITED}
[models."claude-slots-*"]
rpm = "unlimited"
max_concurrency = 2
{UNLIMITED}
[models."claude-slow-*"]
rpm = 6
max_concurrency = 100
{UNLIMITED}
[models."claude-*"]
rpm = 1000000
max_concurrency = 1000
{UNLIMITED}
[models."claude-prio-*"]
rpm = "unlimited"
max_concurrency = 1
{UNLIMITED}
[models."claude-tokens-*"]
rpm = 60000
input_tpm = "unlimited"
output_tpm = 8000
max_concurrency = 100

[models."claude-fair-*"]
rpm = 240
max_concurrency = 100
burst_seconds = 0.25
{UNLIMITED}
[models."claude-adapt-*"]
rpm = 240
max_concurrency = 100
burst_seconds = 0.25
{UNLIMITED}
"""


@pytest.fixture(scope="module")
def rl_simulator() -> Iterator[Simulator]:
    with Simulator() as server:
        yield server


@pytest.fixture(scope="module")
def rl_env(
    test_env: dict[str, str], rl_simulator: Simulator, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    limits = tmp_path_factory.mktemp("rl") / "limits.toml"
    limits.write_text(LIMITS)
    redis_url = test_env["PROMPTQ_REDIS_URL"].rsplit("/", 1)[0] + "/1"
    redis.Redis.from_url(redis_url).flushdb()
    return {
        **test_env,
        "PROMPTQ_REDIS_URL": redis_url,
        "PROMPTQ_UPSTREAM_URL": rl_simulator.url,
        "PROMPTQ_LIMITS_FILE": str(limits),
        "PROMPTQ_SLOT_LEASE_SECONDS": "3",
        "PROMPTQ_CLAIM_LEASE_SECONDS": "6",
    }


@pytest.fixture(scope="module")
def rl_workers(
    rl_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[subprocess.Popen[bytes]]]:
    logs = tmp_path_factory.mktemp("rl-workers")
    workers = [start_worker(rl_env, logs / f"worker-{i}.log", concurrency=8) for i in range(3)]
    yield workers
    for process in workers:
        stop_worker(process)


@pytest.fixture(scope="module")
def rl_client(rl_env: dict[str, str], rl_workers: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from api.app import create_app

    settings = Settings(
        database_url=rl_env["PROMPTQ_DATABASE_URL"],
        redis_url=rl_env["PROMPTQ_REDIS_URL"],
        upstream_url=rl_env["PROMPTQ_UPSTREAM_URL"],
    )
    with TestClient(create_app(settings)) as client:
        yield client


def submit(client: Any, key: str, model: str, prompt: str, **fields: Any) -> str:
    response = client.post(
        "/v1/jobs", json={"prompt": prompt, "model": model, **fields}, headers=auth(key)
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def wait_all(
    client: Any, key: str, job_ids: list[str], timeout: float = 60
) -> list[dict[str, Any]]:
    return [wait_for_status(client, key, job_id, FINAL, timeout=timeout) for job_id in job_ids]


def first_attempt_start(database_url: str, job_id: str) -> float:
    with session_scope(database_url) as session:
        attempts = JobRepository(session).attempts_for(job_id)
        return attempts[0].started_at.timestamp()


def test_limits_hold_across_worker_processes(
    rl_client: Any, api_key: str, rl_simulator: Simulator
) -> None:
    # The simulator enforces the same 240/min, second by second; promptq must never trip it.
    rl_simulator.configure(rpm=240, burst_seconds=1.0)
    try:
        rl_simulator.reset()
        started = time.monotonic()
        ids = [submit(rl_client, api_key, "claude-hold-1", f"hold {i}") for i in range(24)]
        jobs = wait_all(rl_client, api_key, ids)
        elapsed = time.monotonic() - started
        stats = rl_simulator.stats()
    finally:
        rl_simulator.configure(rpm=None)
    assert all(job["status"] == "succeeded" for job in jobs)
    assert stats["by_status"].get("429", 0) == 0
    assert all(job["attempts"] == 1 for job in jobs)
    # 24 calls at 4 a second take about 6 seconds, less the small burst.
    assert elapsed > 4.5
    assert max(stats["calls_by_second"].values()) <= 4 + 1 + 1


def test_large_calls_run_together_up_to_the_output_token_capacity(
    rl_client: Any, api_key: str, rl_simulator: Simulator
) -> None:
    # Anthropic's first tier: 8,000 output tokens a minute, in a bucket a minute deep. Seven
    # calls of max_tokens 1,024 fit in it at once; a meter of half a second of the rate
    # (67 tokens) would let them through one at a time, 2 s each.
    rl_simulator.configure(output_tpm=8000)
    try:
        rl_simulator.reset()
        started = time.monotonic()
        ids = [
            submit(
                rl_client,
                api_key,
                "claude-tokens-1",
                f"large {i} {uuid.uuid4()} [[sim:latency=2]] [[sim:output=100]]",
                max_tokens=1024,
            )
            for i in range(7)
        ]
        jobs = wait_all(rl_client, api_key, ids)
        elapsed = time.monotonic() - started
        stats = rl_simulator.stats()
    finally:
        rl_simulator.configure(output_tpm=None)
    assert all(job["status"] == "succeeded" for job in jobs)
    assert stats["by_status"].get("429", 0) == 0
    assert stats["max_in_flight"] == 7
    assert elapsed < 8  # one at a time would take 14 s


def test_a_429_pauses_every_worker(rl_client: Any, api_key: str, rl_env: dict[str, str]) -> None:
    throttled = submit(rl_client, api_key, "claude-pause-1", f"{uuid.uuid4()} [[sim:429 x1]]")
    job = wait_for_status(rl_client, api_key, throttled, {"retrying", "succeeded"})
    paused_at = time.time()
    others = [submit(rl_client, api_key, "claude-pause-1", f"after the 429 {i}") for i in range(6)]
    unaffected = submit(rl_client, api_key, "claude-other-1", "another model")
    assert wait_for_status(rl_client, api_key, unaffected, FINAL)["status"] == "succeeded"
    assert first_attempt_start(rl_env["PROMPTQ_DATABASE_URL"], unaffected) < paused_at + 0.9
    jobs = wait_all(rl_client, api_key, [throttled, *others])
    assert all(j["status"] == "succeeded" for j in jobs)
    # retry-after was 1 s: no worker called the model again before it passed.
    starts = [first_attempt_start(rl_env["PROMPTQ_DATABASE_URL"], i) for i in others]
    retry_after_end = paused_at - 0.2 + 1.0  # the 429 came just before we saw it
    assert min(starts) >= retry_after_end - 0.3, (job, starts, paused_at)


def test_a_slow_model_does_not_block_a_fast_one(
    rl_client: Any, api_key: str, rl_env: dict[str, str]
) -> None:
    slow = [
        submit(rl_client, api_key, "claude-slow-1", f"slow {i} {uuid.uuid4()}") for i in range(6)
    ]
    time.sleep(0.5)
    started = time.monotonic()
    fast = [submit(rl_client, api_key, "claude-fast-1", f"fast {i}") for i in range(10)]
    assert all(j["status"] == "succeeded" for j in wait_all(rl_client, api_key, fast))
    assert time.monotonic() - started < 5
    states = [rl_client.get(f"/v1/jobs/{i}", headers=auth(api_key)).json() for i in slow]
    waiting = [s for s in states if s["status"] == "queued"]
    assert len(waiting) >= 4  # one call per 10 s: most are still waiting
    assert {s["waiting_for"] for s in waiting} <= {"rpm", "queue"}
    assert "rpm" in {s["waiting_for"] for s in waiting}

    shown = subprocess.run(
        [sys.executable, "-m", "promptq", "limits", "--json"],
        env={**os.environ, **rl_env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    buckets = {b["model"]: b for b in json.loads(shown.stdout)["buckets"]}
    assert buckets["claude-slow-1"]["waiting"] >= 4
    assert buckets["claude-slow-1"]["limits"]["rpm"] == 6
    for job_id in slow:
        rl_client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(api_key))


def test_waiting_jobs_run_by_priority(rl_client: Any, api_key: str) -> None:
    blocker = submit(rl_client, api_key, "claude-prio-1", "hold the slot [[sim:latency=1.5]]")
    wait_for_status(rl_client, api_key, blocker, {"running"})
    low = [
        submit(rl_client, api_key, "claude-prio-1", f"low {i}", priority="low") for i in range(3)
    ]
    high = submit(rl_client, api_key, "claude-prio-1", "high", priority="high")
    jobs = {j["id"]: j for j in wait_all(rl_client, api_key, [blocker, *low, high])}
    assert all(j["status"] == "succeeded" for j in jobs.values())
    order = sorted(jobs, key=lambda i: jobs[i]["finished_at"])
    assert order[:2] == [blocker, high]
    assert order[2:] == low  # then the low ones, in the order they came


def test_slots_of_a_killed_worker_free_themselves(
    api_key: str, rl_env: dict[str, str], tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    # A Redis database of its own, so that the only worker is the one about to be killed.
    env = {**rl_env, "PROMPTQ_REDIS_URL": rl_env["PROMPTQ_REDIS_URL"].rsplit("/", 1)[0] + "/3"}
    redis.Redis.from_url(env["PROMPTQ_REDIS_URL"]).flushdb()
    settings = Settings(
        database_url=env["PROMPTQ_DATABASE_URL"], redis_url=env["PROMPTQ_REDIS_URL"]
    )
    doomed = start_worker(env, tmp_path / "doomed.log", concurrency=4)
    with TestClient(create_app(settings)) as client:
        try:
            # Two calls take both slots of claude-slots-*; then their worker dies.
            holders = [
                submit(client, api_key, "claude-slots-1", f"{uuid.uuid4()} [[sim:latency=30]]")
                for _ in range(2)
            ]
            for job_id in holders:
                wait_for_status(client, api_key, job_id, {"running"})
        finally:
            doomed.kill()
            doomed.wait()
        killed_at = time.monotonic()
        job_id = submit(client, api_key, "claude-slots-1", "after the kill")
        survivor = start_worker(env, tmp_path / "survivor.log", concurrency=4)
        try:
            job = wait_for_status(client, api_key, job_id, FINAL, timeout=30)
        finally:
            stop_worker(survivor)
        assert job["status"] == "succeeded"
        # The slots' leases (3 s in these tests) ran out; nobody had to free them by hand.
        assert time.monotonic() - killed_at < 12
        for holder in holders:
            client.post(f"/v1/jobs/{holder}/cancel", headers=auth(api_key))


def test_a_limit_set_too_high_comes_down_by_itself(
    rl_client: Any, api_key: str, rl_simulator: Simulator
) -> None:
    # promptq is told 240/min; the upstream grants 120/min and does not say so in headers.
    rl_simulator.configure(rpm=120, burst_seconds=1.0, ratelimit_headers=False)
    try:
        rl_simulator.reset()
        ids = [submit(rl_client, api_key, "claude-adapt-1", f"adapt {i}") for i in range(30)]
        jobs = wait_all(rl_client, api_key, ids, timeout=90)
        stats = rl_simulator.stats()
    finally:
        rl_simulator.configure(rpm=None, ratelimit_headers=True)
    assert all(job["status"] == "succeeded" for job in jobs)
    throttled = stats["by_status"].get("429", 0)
    assert throttled > 0  # it had to find out
    assert throttled / stats["calls"] < 0.35


def test_a_key_rpm_spreads_its_jobs(rl_client: Any, make_key: Any) -> None:
    key = make_key("slow-client", rpm=60)
    ids = [submit(rl_client, key, "claude-keyed-1", f"keyed {i}") for i in range(3)]
    time.sleep(0.3)
    waiting = rl_client.get(f"/v1/jobs/{ids[2]}", headers=auth(key)).json()
    assert waiting["status"] == "queued" and waiting["waiting_for"] == "key_rpm"
    jobs = wait_all(rl_client, key, ids)
    starts = sorted(j["started_at"] for j in jobs)
    from datetime import datetime

    moments = [datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() for s in starts]
    assert moments[2] - moments[0] >= 1.7  # one a second


def test_a_key_flooding_high_priority_jobs_cannot_starve_another(
    rl_client: Any, make_key: Any, rl_env: dict[str, str]
) -> None:
    # Key A sends 160 jobs marked high at a model held to 4 a second (40 s of work); key B
    # then sends 5 normal ones. B waits behind only A's few high jobs, then takes turns.
    flood, patient = make_key("flood"), make_key("patient")
    for i in range(160):
        submit(rl_client, flood, "claude-fair-1", f"flood {i} {uuid.uuid4()}", priority="high")
    started = time.monotonic()
    mine = [submit(rl_client, patient, "claude-fair-1", f"patient {i}") for i in range(5)]
    jobs = wait_all(rl_client, patient, mine, timeout=30)
    elapsed = time.monotonic() - started
    assert all(job["status"] == "succeeded" for job in jobs)
    # Five high of A's, then A and B alternate: about 15 calls at 4 a second.
    assert elapsed < 10, elapsed
    subprocess.run(
        [sys.executable, "-m", "promptq", "keys", "revoke", "flood"],
        env={**os.environ, **rl_env},
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=True,
    )
