"""Revoking a key ends everything it set going: its jobs not yet started are canceled, its
batches end, its subscriptions are disabled and its pending deliveries stop; every API
process refuses it within a second; a worker never starts a job of a revoked key.

These tests run on a Redis database of their own with no worker of the session's, so the
jobs they submit stay queued until the test says otherwise.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests
from helpers import auth, run_promptq, running_api, start_worker, stop_worker

from promptq.config import Settings
from promptq.db import session_scope
from promptq.keys.service import authenticate
from promptq.models import ApiKey, Job, MessageBatch, WebhookDelivery, WebhookSubscription
from promptq.simulator import Simulator
from promptq.testing import SentMessages
from promptq.webhooks import deliveries


def revoke_with_cli(env: dict[str, str], ident: str) -> subprocess.CompletedProcess[str]:
    return run_promptq("keys", "revoke", ident, env={**os.environ, **env})


def test_every_api_process_refuses_a_revoked_key_within_a_second(
    quiet_env: dict[str, str], tmp_path: Path, make_key: Any
) -> None:
    key = make_key("revoked-everywhere")
    with ExitStack() as stack:
        urls = [
            stack.enter_context(running_api(quiet_env, tmp_path / f"api-{i}.log")) for i in (1, 2)
        ]
        # Each process has checked the key, and keeps it in its cache of checked keys.
        for url in urls:
            assert requests.get(f"{url}/v1/jobs", headers=auth(key), timeout=5).status_code == 200
        revoke_with_cli(quiet_env, "revoked-everywhere")
        revoked_at = time.monotonic()
        refused: dict[str, float] = {}
        while len(refused) < len(urls) and time.monotonic() - revoked_at < 3:
            for url in urls:
                if url not in refused:
                    status = requests.get(
                        f"{url}/v1/jobs", headers=auth(key), timeout=5
                    ).status_code
                    if status == 401:
                        refused[url] = time.monotonic() - revoked_at
            time.sleep(0.05)
    assert set(refused) == set(urls), refused
    assert max(refused.values()) < 1.0, refused


def test_revocation_ends_what_the_key_set_going(
    quiet_env: dict[str, str], tmp_path: Path, make_key: Any, simulator: Simulator
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    settings = Settings(
        database_url=quiet_env["PROMPTQ_DATABASE_URL"], redis_url=quiet_env["PROMPTQ_REDIS_URL"]
    )
    key = make_key("to-be-revoked")
    marker = uuid.uuid4().hex
    with TestClient(create_app(settings)) as client:
        jobs = [
            client.post("/v1/jobs", json={"prompt": f"{marker} job {i}"}, headers=auth(key)).json()[
                "id"
            ]
            for i in range(5)
        ]
        batch = client.post(
            "/v1/messages/batches",
            json={
                "requests": [
                    {
                        "custom_id": f"r{i}",
                        "params": {
                            "model": "claude-sonnet-4-6",
                            "max_tokens": 10,
                            "messages": [{"role": "user", "content": f"{marker} batch {i}"}],
                        },
                    }
                    for i in range(3)
                ]
            },
            headers=auth(key),
        ).json()
        hook = client.post(
            "/v1/webhooks",
            json={"url": "http://127.0.0.1:9/hook", "events": ["batch.ended"]},
            headers=auth(key),
        ).json()
    # The delivery's message is kept here, not sent: it stays pending.
    unsent = SentMessages()
    with session_scope(quiet_env["PROMPTQ_DATABASE_URL"], unsent) as session:
        record = authenticate(session, key)
        assert record is not None
        key_id = record.id
        # A delivery still to be sent (as a batch's end would make one).
        deliveries.batch_event(session, key_id, {"id": "msgbatch_x"})
    [pending] = unsent.deliveries

    result = revoke_with_cli(quiet_env, key_id)
    # Five jobs and the batch's three requests.
    assert "8 jobs not yet started canceled, 1 batches canceled" in result.stdout, result.stdout

    with session_scope(quiet_env["PROMPTQ_DATABASE_URL"]) as session:
        for job_id in jobs:
            job = session.get(Job, job_id)
            assert job is not None
            assert (job.status, job.error_type) == ("canceled", "key_revoked")
        ended = session.get(MessageBatch, batch["id"])
        assert ended is not None and ended.processing_status == "ended"
        subscription = session.get(WebhookSubscription, hook["id"])
        assert subscription is not None and subscription.disabled_at is not None
        assert "revoked" in (subscription.disabled_reason or "")
        delivery = session.get(WebhookDelivery, pending)
        assert delivery is not None and delivery.status == "failed"

    # The canceled jobs' messages are still in the broker: a worker now running them, and a
    # job that slipped into the queue after the revocation, never reach the upstream.
    from promptq.broker.celery_app import create_celery
    from promptq.broker.publish import publish_job
    from promptq.jobs.service import create_job
    from promptq.jobspec.schemas import JobCreate

    with session_scope(quiet_env["PROMPTQ_DATABASE_URL"]) as session:
        revoked = session.get(ApiKey, key_id)
        assert revoked is not None
        late = create_job(
            session, settings, revoked, JobCreate.model_validate({"prompt": f"{marker} late"})
        ).job.id
    publish_job(create_celery(settings), late)
    worker = start_worker(quiet_env, tmp_path / "worker.log", concurrency=4)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with session_scope(quiet_env["PROMPTQ_DATABASE_URL"]) as session:
                slipped = session.get(Job, late)
                assert slipped is not None
                if slipped.status != "queued":
                    break
            time.sleep(0.1)
    finally:
        stop_worker(worker)
    assert (slipped.status, slipped.error_type) == ("canceled", "key_revoked")
    assert not [p for p in simulator.stats()["calls_by_prompt"] if marker in p]
