"""A worker whose greenlets all end at once: every one acknowledges its own message then, and
every acknowledgement must reach the broker (kombu's default pool of 10 connections once
made the ones past it fail, and took a message the consumer had just taken with them)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from helpers import start_worker, stop_worker, unique
from sqlalchemy import func, select

from promptq.broker.celery_app import create_celery
from promptq.broker.publish import publish_jobs
from promptq.config import Settings
from promptq.db import session_scope
from promptq.jobs import service
from promptq.jobspec.schemas import JobCreate
from promptq.keys.service import authenticate
from promptq.models import Job
from promptq.testing import SONNET

CONCURRENCY = 100
JOBS = 300


def test_a_burst_of_task_ends_acknowledges_every_message(
    quiet_env: dict[str, str], make_key: Any, tmp_path: Path
) -> None:
    settings = Settings(
        database_url=quiet_env["PROMPTQ_DATABASE_URL"], redis_url=quiet_env["PROMPTQ_REDIS_URL"]
    )
    plain = make_key("burst")
    with session_scope(settings) as session:
        key = authenticate(session, plain)
        assert key is not None
        # The same latency for all: each wave of CONCURRENCY calls ends together.
        body = {"model": SONNET, "max_tokens": 8}
        ids = [
            service.create_job(
                session,
                settings,
                key,
                JobCreate.model_validate({**body, "prompt": unique("[[sim:latency=0.5]] b")}),
            ).job.id
            for _ in range(JOBS)
        ]
    publish_jobs(create_celery(settings), ids, "normal")
    log = tmp_path / "worker.log"
    worker = start_worker(quiet_env, log, concurrency=CONCURRENCY)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _succeeded(settings, ids) < JOBS:
            time.sleep(0.2)
        assert _succeeded(settings, ids) == JOBS
    finally:
        stop_worker(worker)
    text = log.read_text()
    assert "Couldn't ack" not in text
    assert "Too many connections" not in text


def _succeeded(settings: Settings, ids: list[str]) -> int:
    with session_scope(settings) as session:
        query = select(func.count()).where(Job.id.in_(ids), Job.status == "succeeded")
        return int(session.scalar(query) or 0)
