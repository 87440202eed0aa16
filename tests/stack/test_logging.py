"""Logs: one JSON object per line naming the job, and never a secret, in a unit test of the
formatter and the redaction filter, and in the logs of real worker, beat and API processes."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from fastapi.testclient import TestClient
from helpers import auth, start_process, start_worker, stop_worker, wait_for_status

from promptq.config import Settings
from promptq.logging import (
    REDACTED,
    ContextFilter,
    JsonFormatter,
    RedactingFilter,
    TextFormatter,
    log_context,
    settings_secrets,
)
from promptq.testing import FINAL

# The unit tests' upstream key; the process tests check the session's own (test_env).
UPSTREAM_KEY = "sk-unit-test-upstream-secret-9876543210"
ADMIN_TOKEN = "admin-token-for-the-logging-test-42"
CLIENT_KEY = "pq_" + "k" * 43
WEBHOOK_SECRET = "whsec_" + "A" * 30 + "=="
BEARER = "Bearer some.opaque-token_123"
SECRETS = (UPSTREAM_KEY, ADMIN_TOKEN, CLIENT_KEY, WEBHOOK_SECRET, "some.opaque-token_123")
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger wired as a promptq service wires the root: context, redaction, JSON."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactingFilter(secrets=[UPSTREAM_KEY, ADMIN_TOKEN]))
    logger = logging.getLogger(f"promptq.test.{uuid.uuid4().hex[:6]}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield logger, stream
    logger.removeHandler(handler)


def lines_of(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_one_json_object_per_line_with_the_job_id(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    logger.info("job %s attempt %d", "job_1", 2, extra={"job_id": "job_1", "attempt": 2})
    logger.warning("two\nlines in one message")
    try:
        raise RuntimeError("it broke")
    except RuntimeError:
        logger.exception("failed", extra={"job_id": "job_2"})

    first, second, third = lines_of(stream)
    assert list(first)[:4] == ["ts", "level", "logger", "message"]
    assert TS.match(first["ts"])
    assert first["level"] == "INFO" and first["logger"] == logger.name
    assert first["message"] == "job job_1 attempt 2"
    assert first["job_id"] == "job_1" and first["attempt"] == 2
    assert second["message"] == "two\nlines in one message"
    assert third["job_id"] == "job_2" and third["level"] == "ERROR"
    assert isinstance(third["exception"], str)
    assert "RuntimeError: it broke" in third["exception"]


def test_log_context_names_the_job_on_every_record(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    with log_context(job_id="job_ctx", task="promptq.run_job"):
        logger.info("inside")
        logger.info("explicit wins", extra={"job_id": "job_explicit"})
    logger.info("outside")
    inside, explicit, outside = lines_of(stream)
    assert inside["job_id"] == "job_ctx" and inside["task"] == "promptq.run_job"
    assert explicit["job_id"] == "job_explicit"
    assert "job_id" not in outside and "task" not in outside


def test_secrets_are_masked_in_message_extras_and_exception(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    headers = {"Authorization": BEARER, "x-api-key": CLIENT_KEY}
    extra = {
        "headers": headers,
        "secrets": [WEBHOOK_SECRET, ("nested", UPSTREAM_KEY)],
        "token": ADMIN_TOKEN,
    }
    logger.info(
        "calling with %s, key %s, secret %s, %s and admin %s",
        UPSTREAM_KEY,
        CLIENT_KEY,
        WEBHOOK_SECRET,
        BEARER,
        ADMIN_TOKEN,
        extra=extra,
    )
    try:
        raise ValueError(f"upstream refused {UPSTREAM_KEY} and {CLIENT_KEY}")
    except ValueError:
        logger.exception("failed with %s", WEBHOOK_SECRET)
    output = stream.getvalue()
    for secret in SECRETS:
        assert secret not in output, secret
    message, failure = lines_of(stream)
    assert message["message"] == (
        f"calling with {REDACTED}, key pq_{REDACTED}, secret whsec_{REDACTED}, "
        f"Bearer {REDACTED} and admin {REDACTED}"
    )
    assert message["headers"] == {
        "Authorization": f"Bearer {REDACTED}",
        "x-api-key": f"pq_{REDACTED}",
    }
    assert message["secrets"] == [f"whsec_{REDACTED}", ["nested", REDACTED]]
    assert message["token"] == REDACTED
    assert failure["message"] == f"failed with whsec_{REDACTED}"
    assert f"ValueError: upstream refused {REDACTED} and pq_{REDACTED}" in failure["exception"]
    # The caller's own objects are left as they were.
    assert headers["Authorization"] == BEARER


def test_text_format_masks_too_and_names_the_job() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    handler.addFilter(RedactingFilter(secrets=[UPSTREAM_KEY]))
    record = logging.LogRecord(
        "promptq.x", logging.INFO, __file__, 1, "key %s", (UPSTREAM_KEY,), None
    )
    record.job_id = "job_text"
    handler.handle(record)
    line = stream.getvalue()
    assert UPSTREAM_KEY not in line
    assert line.rstrip().endswith(f"promptq.x: key {REDACTED} [job_id=job_text]")


def test_the_settings_secrets_are_all_known() -> None:
    settings = Settings.model_validate(
        {
            "upstream_api_key": UPSTREAM_KEY,
            "admin_token": ADMIN_TOKEN,
            "flower_basic_auth": "admin:flower-password-123",
            "database_url": "postgresql+psycopg://promptq:db-password-456@db:5432/promptq",
            "redis_url": "redis://:redis-password-789@redis:6379/0",
        }
    )
    found = settings_secrets(settings)
    for secret in (
        UPSTREAM_KEY,
        ADMIN_TOKEN,
        "flower-password-123",
        "db-password-456",
        "redis-password-789",
    ):
        assert secret in found


def test_log_settings_read_any_case() -> None:
    settings = Settings.model_validate({"log_format": "TEXT", "log_level": "debug"})
    assert (settings.log_format, settings.log_level) == ("text", "DEBUG")
    with pytest.raises(ValueError, match="log_format"):
        Settings.model_validate({"log_format": "xml"})


def _isolated_redis(redis_url: str) -> str:
    """Another database of the session's Redis: a broker and limiter of this test's own, so
    its jobs run on its worker and on no other."""
    url = urlsplit(redis_url)._replace(path="/9").geturl()
    redis.Redis.from_url(url).flushdb()
    return url


def _json_lines(log: Path) -> list[dict[str, Any]]:
    """Every line of the log, each of which must be one JSON object."""
    records = []
    for number, line in enumerate(log.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"{log.name} line {number} is not JSON: {line!r}") from None
        assert isinstance(record, dict), line
        assert {"ts", "level", "logger", "message"} <= set(record), line
        records.append(record)
    return records


def test_worker_and_beat_log_json_lines_without_the_upstream_key(
    test_env: dict[str, str], settings: Settings, redis_url: str, api_key: str, tmp_path: Path
) -> None:
    env = {
        **test_env,
        "PROMPTQ_REDIS_URL": _isolated_redis(redis_url),
        # DEBUG: as much of Celery's, kombu's and requests' logging as there is to check.
        "PROMPTQ_LOG_LEVEL": "DEBUG",
        "PROMPTQ_LOG_FORMAT": "json",
        "PROMPTQ_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    worker_log, beat_log = tmp_path / "worker.log", tmp_path / "beat.log"
    worker = start_worker(env, worker_log, concurrency=4)
    beat: subprocess.Popen[bytes] | None = None
    try:
        beat = start_process(["beat", f"--schedule={tmp_path / 'schedule'}"], env, beat_log)
        app_settings = settings.model_copy(update={"redis_url": env["PROMPTQ_REDIS_URL"]})
        from api.app import create_app

        with TestClient(create_app(app_settings)) as client:
            ids = [
                client.post("/v1/jobs", json={"prompt": prompt}, headers=auth(api_key)).json()["id"]
                for prompt in (f"log me {uuid.uuid4().hex}", "[[sim:401]] bad key, says upstream")
            ]
            jobs = [wait_for_status(client, api_key, job_id, FINAL, timeout=30) for job_id in ids]
        assert [job["status"] for job in jobs] == ["succeeded", "failed"]

        deadline = time.monotonic() + 20
        while b"beat: Starting" not in beat_log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        # Read while both still run: what they log, not what a shutdown prints.
        worker_records, beat_records = _json_lines(worker_log), _json_lines(beat_log)
    finally:
        stop_worker(worker)
        if beat is not None:
            stop_worker(beat)

    loggers = {record["logger"] for record in worker_records}
    assert "promptq.jobs.runner" in loggers and "celery.apps.worker" in loggers
    for job in jobs:
        attempts = [
            r
            for r in worker_records
            if r["logger"] == "promptq.jobs.runner" and r.get("job_id") == job["id"]
        ]
        assert attempts, f"no runner record names {job['id']}"
        assert attempts[0]["attempt"] == 1 and attempts[0]["task"] == "promptq.run_job"
    assert any("beat: Starting" in record["message"] for record in beat_records)
    for log in (worker_log, beat_log):
        text = log.read_text()
        for secret in (test_env["PROMPTQ_UPSTREAM_API_KEY"], ADMIN_TOKEN, api_key):
            assert secret not in text, f"{log.name} shows a secret"


def test_api_logs_json_lines(api_server: str, test_env: dict[str, str], tmp_path: Path) -> None:
    records = _json_lines(tmp_path / "api.log")
    assert any(
        record["logger"].startswith("uvicorn") and "running on" in record["message"]
        for record in records
    ), records
    assert test_env["PROMPTQ_UPSTREAM_API_KEY"] not in (tmp_path / "api.log").read_text()
