"""Configuration a hostile key holder could exploit, or an operator could get wrong (issue 13):
weak secrets refused at start, the broker's serializer pinned, no parameter in a database
error, control characters a 422, a warning for a clear-text upstream."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import auth, run_promptq
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from promptq.config import Settings, upstream_warning
from promptq.db import get_sessionmaker

STRONG = "t" + "0123456789abcdef" * 2


def start(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`promptq ARGS`, which must exit by itself (refuse) rather than serve."""
    redis_away = {"PROMPTQ_REDIS_URL": "redis://127.0.0.1:1/0"}
    return run_promptq(*args, env={**os.environ, **redis_away, **env}, check=False)


@pytest.mark.parametrize(
    ("token", "says"),
    [
        ("REPLACE-ME", "placeholder"),
        ("changeme-please", "placeholder"),
        ("s3cret-but-short-0123", "32"),
    ],
)
def test_the_api_refuses_to_start_with_a_weak_admin_token(
    token: str, says: str, tmp_path: Path
) -> None:
    done = start(["api", "--port", "1"], PROMPTQ_ADMIN_TOKEN=token)
    assert done.returncode != 0
    assert "PROMPTQ_ADMIN_TOKEN" in done.stderr and says in done.stderr, done.stderr
    assert token not in done.stderr + done.stdout  # never echoed


@pytest.mark.parametrize(
    ("credentials", "says"), [("admin:REPLACE-ME", "placeholder"), ("admin:hunter2", "7")]
)
def test_flower_refuses_to_start_with_a_weak_password(credentials: str, says: str) -> None:
    done = start(["flower", "--port", "1"], PROMPTQ_FLOWER_BASIC_AUTH=credentials)
    assert done.returncode != 0
    assert "PROMPTQ_FLOWER_BASIC_AUTH" in done.stderr and says in done.stderr, done.stderr


def test_celery_is_pinned_to_json(settings: Settings) -> None:
    """Said in promptq's configuration, not left to Celery's defaults of the day."""
    from promptq.broker.celery_app import create_celery

    conf = create_celery(settings).conf
    for name in ("task_serializer", "result_serializer", "event_serializer"):
        assert conf.changes.get(name) == "json", name
    assert list(conf.changes.get("accept_content", [])) == ["json"]


def test_a_database_error_never_shows_its_parameters(database_url: str, test_env: Any) -> None:
    session = get_sessionmaker(database_url)()
    try:
        with pytest.raises(DBAPIError) as caught:
            session.execute(
                text("SELECT * FROM no_such_table WHERE prompt = :prompt"),
                {"prompt": "a private prompt"},
            )
    finally:
        session.rollback()
        session.close()
    assert "a private prompt" not in str(caught.value)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/job_%00x",
        "/v1/jobs/job_x%01",
        "/v1/jobs?after=job_%00",
        "/v1/jobs?status=succeeded%00",
        "/v1/messages/batches/msgbatch_%00",
        "/v1/webhooks/sub_%7F",
        "/v1/templates/t%00",
    ],
)
def test_a_control_character_in_an_id_is_refused(client: Any, api_key: str, path: str) -> None:
    response = client.get(path, headers=auth(api_key))
    # The refusal rule: 422, or 400 on the Anthropic-compatible paths.
    assert response.status_code == (400 if "/v1/messages" in path else 422), response.text
    assert "control character" in response.json()["error"]["message"]


def test_a_control_character_in_a_model_name_is_a_422(client: Any, api_key: str) -> None:
    for body in (
        {"prompt": "x", "model": "claude\x00"},
        {"prompt": "x", "idempotency_key": "k\x00"},
        {
            "request": {
                "model": "claude-\x1b[31m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
            }
        },
    ):
        response = client.post("/v1/jobs", json=body, headers=auth(api_key))
        assert response.status_code == 422, response.text
        assert "control character" in response.json()["error"]["message"]
    template = client.post(
        "/v1/templates",
        json={"name": "t", "prompt": "x", "model": "m\x00"},
        headers=auth(api_key),
    )
    assert template.status_code == 422, template.text
    nul = client.post("/v1/templates", json={"name": "t", "prompt": "a\x00"}, headers=auth(api_key))
    assert nul.status_code == 422 and "NUL" in nul.json()["error"]["message"]
    hook = client.post(
        "/v1/webhooks", json={"url": "https://example.com/\x00"}, headers=auth(api_key)
    )
    assert hook.status_code == 422 and "control character" in hook.json()["error"]["message"]


def test_a_batch_request_with_a_control_character_in_its_model_fails_alone(
    client: Any, api_key: str
) -> None:
    """Its error is stored with it (PostgreSQL must take the row); the batch is created."""
    requests = [
        {
            "custom_id": "bad",
            "params": {
                "model": "m\x00",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
            },
        }
    ]
    response = client.post(
        "/v1/messages/batches", json={"requests": requests}, headers=auth(api_key)
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("http://upstream.example.com", True),
        ("http://10.0.0.5:8080", True),
        ("https://api.cometapi.com", False),
        ("http://127.0.0.1:9000", False),
        ("http://localhost:9000", False),
        ("http://[::1]:9000", False),
    ],
)
def test_a_clear_text_upstream_off_this_machine_is_warned_of(url: str, warned: bool) -> None:
    warning = upstream_warning(Settings(upstream_url=url))
    assert (warning is not None) == warned
    if warning:
        assert "PROMPTQ_UPSTREAM_URL" in warning and "https" in warning


def test_the_worker_logs_the_clear_text_warning(tmp_path: Path) -> None:
    """`promptq worker` says it where the operator looks; it then fails on the unreachable
    Redis, which is not this test's business."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from promptq.cli.services import preflight; "
            "from promptq.config import Settings; preflight(Settings())",
        ],
        env={
            **os.environ,
            "PROMPTQ_UPSTREAM_URL": "http://upstream.example.com",
            "PROMPTQ_LOG_FORMAT": "text",
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "plain http to upstream.example.com" in done.stderr + done.stdout
