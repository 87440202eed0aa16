"""The job API at intake: authentication, validation, isolation, paging, cancel, limits.

These run against the real database and broker; no worker is needed, so jobs stay queued
unless a worker from another test module happens to be running.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from helpers import auth

from promptq.db import session_scope
from promptq.jobs import service
from promptq.jobspec.schemas import JobCreate
from promptq.keys.service import authenticate
from promptq.models import Job

ONE_MESSAGE = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}


def test_healthz(client: Any) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_checks_database_and_redis(client: Any) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "redis": "ok"}


def test_openapi_documents_job_creation(client: Any) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/x-www-form-urlencoded"}
    assert "prompt" in schema["components"]["schemas"]["JobCreate"]["properties"]
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer pq_wrong"},
        {"x-api-key": "nope"},
        {"Authorization": "Basic x"},
        {"Authorization": "Basic " + base64.b64encode(b"zapier:pq_wrong").decode()},
        {"Authorization": "Basic " + base64.b64encode(b"zapier:not-a-key").decode()},
    ],
)
def test_requests_without_a_valid_key_are_refused(client: Any, headers: dict[str, str]) -> None:
    response = client.post("/v1/jobs", json={"prompt": "hi"}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_x_api_key_header_works(client: Any, api_key: str) -> None:
    response = client.post("/v1/jobs", json={"prompt": "hi"}, headers={"x-api-key": api_key})
    assert response.status_code == 202


@pytest.mark.parametrize("pair", ["{key}:", ":{key}", "zapier:{key}", "{key}:x"])
def test_basic_auth_with_the_key_as_user_or_password_works(
    client: Any, api_key: str, pair: str
) -> None:
    """Zapier's polling trigger speaks only Basic auth."""
    token = base64.b64encode(pair.format(key=api_key).encode()).decode()
    response = client.get("/v1/jobs?status=succeeded", headers={"Authorization": f"Basic {token}"})
    assert response.status_code == 200


def test_revoked_key_is_refused(
    client: Any, api_key: str, database_url: str, settings: Any
) -> None:
    from promptq.jobs.revocation import revoke

    with session_scope(database_url) as session:
        key_id = authenticate(session, api_key).id  # type: ignore[union-attr]
        revoke(session, settings, key_id)
    assert client.get("/v1/jobs", headers=auth(api_key)).status_code == 401


def test_create_with_full_request(client: Any, api_key: str) -> None:
    request = {
        "model": "claude-haiku-4-5",
        "max_tokens": 300,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Name a prime."}],
        "top_k": 5,
        "some_future_param": {"kept": True},
    }
    response = client.post(
        "/v1/jobs",
        json={"request": request, "metadata": {"row": 7}, "priority": "high"},
        headers=auth(api_key),
    )
    assert response.status_code == 202
    job = response.json()
    assert job["id"].startswith("job_")
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["model"] == "claude-haiku-4-5"
    assert job["request"] == request
    assert job["metadata"] == {"row": 7}
    assert job["priority"] == "high"
    assert job["status"] in {"queued", "running", "succeeded"}


def test_flat_prompt_as_json_gets_defaults(client: Any, api_key: str, settings: Any) -> None:
    job = client.post(
        "/v1/jobs",
        json={"prompt": "Hello", "system": "S", "temperature": 0.2},
        headers=auth(api_key),
    ).json()
    assert job["request"] == {
        "model": settings.default_model,
        "max_tokens": settings.default_max_tokens,
        "messages": [{"role": "user", "content": "Hello"}],
        "system": "S",
        "temperature": 0.2,
    }


def test_flat_prompt_as_form(client: Any, api_key: str) -> None:
    response = client.post(
        "/v1/jobs",
        data={
            "prompt": "From a Zap",
            "model": "claude-sonnet-4-5",
            "max_tokens": "50",
            "metadata": '{"zap": 1}',
            "callback_url": "http://127.0.0.1:9/hook",
        },
        headers=auth(api_key),
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["request"]["max_tokens"] == 50
    assert job["request"]["model"] == "claude-sonnet-4-5"
    assert job["metadata"] == {"zap": 1}
    assert job["webhook"]["url"] == "http://127.0.0.1:9/hook"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "temperature": 1.5}, "temperature"),
        ({"prompt": "x", "priority": "urgent"}, "priority"),
        ({"prompt": "x", "promt": "typo"}, "promt"),
        ({"prompt": "x", "metadata": [1, 2]}, "metadata"),
        ({"prompt": "x", "webhook_url": "ftp://example.com"}, "webhook_url"),
        ({"prompt": "x", "request": {"model": "m", "max_tokens": 5, "messages": []}}, "request"),
        (
            {"request": {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}},
            "request.model",
        ),
        (
            {"request": {"model": "m", "messages": [{"role": "user", "content": "x"}]}},
            "request.max_tokens",
        ),
        ({"request": {"model": "m", "max_tokens": 5, "messages": []}}, "request.messages"),
        (
            {
                "request": {
                    "model": "m",
                    "max_tokens": 5,
                    "messages": [{"role": "robot", "content": "x"}],
                }
            },
            "role",
        ),
        (
            {
                "request": {
                    "model": "m",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": []}],
                }
            },
            "content",
        ),
        (
            {
                "request": {
                    **ONE_MESSAGE,
                    "max_tokens": 2000,
                    "thinking": {"type": "enabled", "budget_tokens": 4000},
                }
            },
            "budget_tokens",
        ),
        (
            {
                "request": {
                    **ONE_MESSAGE,
                    "max_tokens": 2000,
                    "thinking": {"type": "enabled", "budget_tokens": 100},
                }
            },
            "budget_tokens",
        ),
        (
            {
                "request": {
                    **ONE_MESSAGE,
                    "max_tokens": 2000,
                    "temperature": 0.5,
                    "thinking": {"type": "enabled", "budget_tokens": 1024},
                }
            },
            "temperature",
        ),
        ({"request": {**ONE_MESSAGE, "stream": True}}, "stream"),
        ({"request": ONE_MESSAGE, "model": "other"}, "model"),
    ],
)
def test_invalid_jobs_are_refused_naming_the_field(
    client: Any, api_key: str, body: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/jobs", json=body, headers=auth(api_key))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert field in error["message"]


@pytest.mark.parametrize(
    ("content", "status", "words"),
    [(b"", 400, "empty body"), (b"{not json", 400, "not valid JSON"), (b"[1]", 422, "object")],
)
def test_malformed_bodies(
    client: Any, api_key: str, content: bytes, status: int, words: str
) -> None:
    response = client.post(
        "/v1/jobs", content=content, headers={**auth(api_key), "content-type": "application/json"}
    )
    assert response.status_code == status
    assert words in response.json()["error"]["message"]


def test_body_over_the_limit_is_413_before_it_is_read(client: Any, api_key: str) -> None:
    big = "x" * (70 * 1024)  # the tests set PROMPTQ_MAX_BODY_BYTES to 64 KiB
    response = client.post("/v1/jobs", json={"prompt": big}, headers=auth(api_key))
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"

    def chunks() -> Any:  # no content-length: the limit must hold while streaming too
        for _ in range(70):
            yield b"x" * 1024

    response = client.post(
        "/v1/jobs", content=chunks(), headers={**auth(api_key), "content-type": "application/json"}
    )
    assert response.status_code == 413


def test_a_key_sees_only_its_own_jobs(client: Any, make_key: Any) -> None:
    alice, bob = make_key("alice"), make_key("bob")
    job = client.post("/v1/jobs", json={"prompt": "alice's"}, headers=auth(alice)).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(alice)).status_code == 200
    other = client.get(f"/v1/jobs/{job['id']}", headers=auth(bob))
    assert other.status_code == 404
    assert other.json()["error"]["type"] == "not_found_error"
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(bob)).status_code == 404
    assert client.get("/v1/jobs", headers=auth(bob)).json()["data"] == []


def test_unknown_job_is_404(client: Any, api_key: str) -> None:
    response = client.get("/v1/jobs/job_nope", headers=auth(api_key))
    assert response.status_code == 404
    assert "job_nope" in response.json()["error"]["message"]


def test_cursor_paging_newest_first(client: Any, api_key: str) -> None:
    created = [
        client.post("/v1/jobs", json={"prompt": f"page {i}"}, headers=auth(api_key)).json()["id"]
        for i in range(7)
    ]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["after"] = cursor
        page = client.get("/v1/jobs", params=params, headers=auth(api_key)).json()
        seen += [job["id"] for job in page["data"]]
        pages += 1
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert pages == 3
    assert seen == list(reversed(created))


def test_status_filter(client: Any, api_key: str, database_url: str, settings: Any) -> None:
    queued = _queued_job(database_url, settings, api_key, "stays queued")
    client.post(f"/v1/jobs/{queued}/cancel", headers=auth(api_key))
    page = client.get("/v1/jobs", params={"status": "canceled"}, headers=auth(api_key)).json()
    assert [job["id"] for job in page["data"]] == [queued]
    bad = client.get("/v1/jobs", params={"status": "done"}, headers=auth(api_key))
    assert bad.status_code == 422
    assert "status" in bad.json()["error"]["message"]
    assert client.get("/v1/jobs", params={"limit": 0}, headers=auth(api_key)).status_code == 422


def test_order_finished_lists_the_latest_finished_first_with_its_own_cursor(
    client: Any, api_key: str, database_url: str, settings: Any
) -> None:
    """What a polling trigger reads: a slow job that finishes after many newer ones is on
    the first page of order=finished, though it is on the last page of the default order."""
    slow = _queued_job(database_url, settings, api_key, "slow")
    quick = [_queued_job(database_url, settings, api_key, f"quick {i}") for i in range(4)]
    _queued_job(database_url, settings, api_key, "never finishes")
    for job_id in [*quick, slow]:  # cancel: finished_at now, in this order
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(api_key)).status_code == 200
    # Two jobs finished in the same microsecond: the id decides, on either side of a page.
    with session_scope(database_url) as session:
        last, before_last = session.get(Job, quick[3]), session.get(Job, quick[2])
        assert last is not None and before_last is not None
        before_last.finished_at = last.finished_at

    by_creation = client.get(
        "/v1/jobs", params={"status": "canceled", "limit": 3}, headers=auth(api_key)
    ).json()
    assert slow not in [job["id"] for job in by_creation["data"]]

    seen: list[str] = []
    params: dict[str, Any] = {"status": "canceled", "limit": 2, "order": "finished"}
    while True:
        page = client.get("/v1/jobs", params=params, headers=auth(api_key)).json()
        seen += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        assert page["next_cursor"].startswith("fin_")
        params["after"] = page["next_cursor"]
    assert seen == [slow, quick[3], quick[2], quick[1], quick[0]]
    # Without a status, the unfinished job is left out: it has no place in this order.
    everything = client.get(
        "/v1/jobs", params={"order": "finished", "limit": 100}, headers=auth(api_key)
    ).json()
    assert [job["id"] for job in everything["data"]] == seen


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"order": "finished", "after": "job_01ABC"}, "not a cursor of order=finished"),
        ({"order": "finished", "after": "fin_!!"}, "not a cursor of order=finished"),
        ({"after": "fin_MjAyNnxqb2I"}, "send order=finished too"),
        ({"order": "newest"}, "order: must be one of created, finished"),
    ],
)
def test_a_wrong_order_or_cursor_says_what_to_send(
    client: Any, api_key: str, params: dict[str, str], words: str
) -> None:
    response = client.get("/v1/jobs", params=params, headers=auth(api_key))
    assert response.status_code == 422
    assert words in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs?after=%00",
        "/v1/jobs?order=finished&after=fin_"
        + base64.urlsafe_b64encode(b"2026-01-01T00:00:00+00:00|\x00").decode(),
        "/v1/jobs/%00",
        "/v1/webhooks/%00",
        "/v1/templates/%00",
        "/v1/messages/batches?after_id=%00",
    ],
)
def test_a_nul_character_in_an_id_is_the_clients_mistake(
    client: Any, api_key: str, database_url: str, path: str
) -> None:
    """PostgreSQL's text holds no NUL, and a NUL is never in an id: the client hears why (a
    4xx by the refusal rule), not a 500. One in the path or query is refused before any
    route runs, on either database; one hidden in a cursor reaches PostgreSQL, which
    refuses the lookup (SQLite finds nothing: an empty page)."""
    response = client.get(path, headers=auth(api_key))
    refusal = 400 if "/v1/messages" in path else 422
    if "%00" in path:
        assert response.status_code == refusal, response.text
        assert "control character" in response.json()["error"]["message"]
    elif database_url.startswith("postgresql"):
        assert response.status_code == refusal, response.text
        assert "NUL character" in response.json()["error"]["message"]
    else:
        assert response.status_code in (200, 404), response.text


def _queued_job(database_url: str, settings: Any, key: str, prompt: str) -> str:
    """A job committed but never published, so it stays queued whatever workers run."""
    with session_scope(database_url) as session:
        record = authenticate(session, key)
        assert record is not None
        created = service.create_job(session, settings, record, JobCreate(prompt=prompt))
        return created.job.id


def test_cancel_queued_job(client: Any, api_key: str, database_url: str, settings: Any) -> None:
    job_id = _queued_job(database_url, settings, api_key, "cancel me")
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(api_key))
    assert response.status_code == 200
    job = response.json()
    assert job["status"] == "canceled"
    assert job["finished_at"] is not None
    # Canceling twice is harmless; canceling a finished job is a conflict with a reason.
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(api_key)).status_code == 200


def test_wait_returns_202_when_time_runs_out(client: Any, api_key: str) -> None:
    # No worker may pick this up within the second: it asks the simulator for 3 s of latency.
    response = client.post(
        "/v1/jobs?wait=1", json={"prompt": "slow [[sim:latency=3]]"}, headers=auth(api_key)
    )
    assert response.status_code == 202
    assert response.json()["status"] in {"queued", "running"}
    assert (
        client.post("/v1/jobs?wait=61", json={"prompt": "x"}, headers=auth(api_key)).status_code
        == 422
    )


def test_idempotency_key_returns_the_first_job(client: Any, api_key: str) -> None:
    headers = {**auth(api_key), "Idempotency-Key": "order-42"}
    first = client.post("/v1/jobs", json={"prompt": "once"}, headers=headers)
    again = client.post("/v1/jobs", json={"prompt": "once"}, headers=headers)
    assert first.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", json={"prompt": "another"}, headers=headers)
    assert other.status_code == 409
    assert "order-42" in other.json()["error"]["message"]
    by_field = client.post(
        "/v1/jobs", json={"prompt": "field", "idempotency_key": "f-1"}, headers=auth(api_key)
    )
    assert (
        client.post(
            "/v1/jobs", json={"prompt": "field", "idempotency_key": "f-1"}, headers=auth(api_key)
        ).json()["id"]
        == by_field.json()["id"]
    )


def test_errors_have_one_shape(client: Any) -> None:
    for response in (client.get("/v1/nothing"), client.delete("/healthz")):
        body = response.json()
        assert set(body) == {"error"}
        assert set(body["error"]) == {"type", "message"}


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5678/webhook",
        "http://2130706433/",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.7/n8n",
        "http://localhost/x",
    ],
)
def test_a_webhook_to_a_private_address_is_refused_at_intake(
    settings: Any, api_key: str, url: str
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    strict = settings.model_copy(update={"webhook_allow_private": False})
    with TestClient(create_app(strict)) as client:
        response = client.post(
            "/v1/jobs", json={"prompt": "x", "callback_url": url}, headers=auth(api_key)
        )
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "webhook_url" in message and "PROMPTQ_WEBHOOK_ALLOW_PRIVATE" in message
