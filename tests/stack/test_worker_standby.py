"""A worker's standby jobs (promptq.jobs.call_slots), in a real `promptq worker` process
against its own simulator: the worker takes more messages than its concurrency, yet never
has more calls in flight; and when it is told to stop, the calls in flight finish while the
standby jobs, untouched, go back to the broker for the next worker, none lost, none run
twice; and a job of a higher priority taken after the standby jobs starts before them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import start_worker, stop_worker, unique
from sqlalchemy import func, select

from promptq.broker.celery_app import create_celery
from promptq.broker.publish import broker_backlog, publish_jobs
from promptq.config import Settings
from promptq.db import session_scope
from promptq.jobs import service
from promptq.jobspec.schemas import JobCreate
from promptq.keys.service import authenticate
from promptq.models import Job
from promptq.simulator import Simulator
from promptq.testing import SONNET

CONCURRENCY = 2
STANDBY = 3
PATIENCE = 30.0


@pytest.fixture
def upstream() -> Iterator[Simulator]:
    """The test's own: its calls in flight are the worker's alone."""
    with Simulator() as server:
        yield server


@pytest.fixture
def env(quiet_env: dict[str, str], upstream: Simulator) -> dict[str, str]:
    return {
        **quiet_env,
        "PROMPTQ_UPSTREAM_URL": upstream.url,
        "PROMPTQ_WORKER_STANDBY_JOBS": str(STANDBY),
    }


def submit(
    env: dict[str, str], plain: str, count: int, latency: float, priority: str = "normal"
) -> list[str]:
    settings = _settings(env)
    with session_scope(settings) as session:
        key = authenticate(session, plain)
        assert key is not None
        prompt = f"[[sim:latency={latency}]]"
        ids = [
            service.create_job(
                session,
                settings,
                key,
                JobCreate.model_validate(
                    {"model": SONNET, "max_tokens": 8, "prompt": unique(prompt)}
                ),
            ).job.id
            for _ in range(count)
        ]
    publish_jobs(create_celery(settings), ids, priority)
    return ids


def test_a_worker_holds_standby_jobs_yet_never_more_calls_than_its_concurrency(
    env: dict[str, str], upstream: Simulator, make_key: Any, tmp_path: Path
) -> None:
    ids = submit(env, make_key("standby"), 4 * (CONCURRENCY + STANDBY), latency=0.5)
    app = create_celery(_settings(env))
    worker = start_worker(env, tmp_path / "worker.log", concurrency=CONCURRENCY)
    try:
        active = _most_active_tasks(app, seconds=3)
        _wait_for(lambda: _count(env, ids, "succeeded") == len(ids))
    finally:
        stop_worker(worker)
    # Messages in hand beyond the calls: the standby jobs, waiting for a slot.
    assert active == CONCURRENCY + STANDBY
    assert upstream.stats()["max_in_flight"] == CONCURRENCY
    assert upstream.stats()["calls"] == len(ids)


def test_a_warm_shutdown_finishes_the_calls_and_puts_the_standby_jobs_back(
    env: dict[str, str], upstream: Simulator, make_key: Any, tmp_path: Path
) -> None:
    latency = 3.0
    ids = submit(env, make_key("shutdown"), CONCURRENCY + STANDBY, latency=latency)
    settings = _settings(env)
    app = create_celery(settings)
    worker = start_worker(env, tmp_path / "first.log", concurrency=CONCURRENCY)
    try:
        _wait_for(lambda: upstream.stats()["in_flight"] == CONCURRENCY)
        _wait_for(lambda: broker_backlog(app) == 0)  # the standby jobs' messages taken
    finally:
        stop_worker(worker)  # SIGTERM while the calls are out
    # The calls in flight ended and were recorded; no other call started.
    assert upstream.stats()["calls"] == CONCURRENCY
    assert _count(env, ids, "succeeded") == CONCURRENCY
    # The others are as they were, their messages back on the broker at once (not after
    # the broker's visibility timeout, nor the sweeper's republishing).
    assert _count(env, ids, "queued") == STANDBY
    assert broker_backlog(app) == STANDBY
    # Each said so in one INFO line: nothing failed (promptq.logging.HandedBackFilter).
    handed_back = _handed_back_lines(tmp_path / "first.log")
    assert {line["level"] for line in handed_back} == {"INFO"}
    assert len({line["data"]["id"] for line in handed_back}) == STANDBY
    assert not any("exception" in line or "traceback" in line["data"] for line in handed_back)

    second = start_worker(env, tmp_path / "second.log", concurrency=CONCURRENCY)
    try:
        _wait_for(lambda: _count(env, ids, "succeeded") == len(ids))
    finally:
        stop_worker(second)
    assert upstream.stats()["calls"] == len(ids)  # none called twice


def _handed_back_lines(log: Path) -> list[dict[str, Any]]:
    """Celery's records of the worker's run_job tasks that put their message back."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if "reject requeue=True" in line["message"]]


def test_a_higher_priority_job_goes_before_the_standby_jobs_already_waiting(
    env: dict[str, str], upstream: Simulator, make_key: Any, tmp_path: Path
) -> None:
    # One call at a time and three standby jobs, all of low priority, in the worker's hands
    # before the high one is published: it reaches the worker once the first job has
    # recorded (its greenlet free), and then waits for the next call to end with two of them.
    plain = make_key("ranked")
    low = submit(env, plain, 1 + STANDBY, latency=1.0, priority="low")
    app = create_celery(_settings(env))
    worker = start_worker(env, tmp_path / "worker.log", concurrency=1)
    try:
        _wait_for(lambda: upstream.stats()["in_flight"] == 1)
        _wait_for(lambda: broker_backlog(app) == 0)  # the standby jobs' messages taken
        [high] = submit(env, plain, 1, latency=1.0, priority="high")
        _wait_for(lambda: _count(env, [*low, high], "succeeded") == len(low) + 1)
    finally:
        stop_worker(worker)
    started = _started_in_order(env, [*low, high])
    # The first low job's call was out and the next took its slot before the high job came;
    # the two still waiting came before it, yet it went first.
    assert started.index(high) == 2, (started, low, high)
    assert upstream.stats()["max_in_flight"] == 1


def _started_in_order(env: dict[str, str], ids: list[str]) -> list[str]:
    with session_scope(_settings(env)) as session:
        query = select(Job.id).where(Job.id.in_(ids)).order_by(Job.started_at)
        return list(session.scalars(query))


def _most_active_tasks(app: Any, seconds: float) -> int:
    """The most tasks the worker reported running at once, asked over Celery's control."""
    most = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        replies = app.control.inspect(timeout=0.5).active() or {}
        most = max(most, sum(len(tasks) for tasks in replies.values()))
    return most


def _wait_for(check: Any) -> None:
    deadline = time.monotonic() + PATIENCE
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _count(env: dict[str, str], ids: list[str], status: str) -> int:
    with session_scope(_settings(env)) as session:
        query = select(func.count()).where(Job.id.in_(ids), Job.status == status)
        return int(session.scalar(query) or 0)


def _settings(env: dict[str, str]) -> Settings:
    return Settings(database_url=env["PROMPTQ_DATABASE_URL"], redis_url=env["PROMPTQ_REDIS_URL"])
