"""Prompt templates as triggers: any webhook source's JSON fills a Jinja2 template rendered
in the sandbox; a missing variable is a 422 that names it; injection cannot reach Python."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import auth, wait_for_status

FINAL = {"succeeded", "failed", "canceled"}


def make_template(client: Any, key: str, **fields: Any) -> dict[str, Any]:
    body = {"name": "triage", "prompt": "Triage issue #{{ number }}: {{ title }}", **fields}
    response = client.post("/v1/templates", json=body, headers=auth(key))
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_a_posted_payload_becomes_a_job(client: Any, worker_process: Any, api_key: str) -> None:
    make_template(
        client,
        api_key,
        system="Repository {{ input.repository.name }}",
        model="claude-haiku-4-5",
        max_tokens=200,
    )
    github = {"number": 42, "title": "Crash on start", "repository": {"name": "promptq"}}
    response = client.post("/v1/templates/triage/jobs", json=github, headers=auth(api_key))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["request"]["messages"][0]["content"] == "Triage issue #42: Crash on start"
    assert job["request"]["system"] == "Repository promptq"
    assert job["model"] == "claude-haiku-4-5" and job["request"]["max_tokens"] == 200
    assert wait_for_status(client, api_key, job["id"], FINAL)["status"] == "succeeded"

    listed = client.get("/v1/templates", headers=auth(api_key)).json()["data"]
    assert [t["name"] for t in listed] == ["triage"]
    assert client.get("/v1/templates/triage", headers=auth(api_key)).json()["model"] == (
        "claude-haiku-4-5"
    )
    assert client.delete("/v1/templates/triage", headers=auth(api_key)).status_code == 200
    assert client.get("/v1/templates/triage", headers=auth(api_key)).status_code == 404


def test_a_missing_variable_is_a_422_naming_it(client: Any, api_key: str) -> None:
    make_template(client, api_key)
    response = client.post("/v1/templates/triage/jobs", json={"number": 1}, headers=auth(api_key))
    assert response.status_code == 422
    assert "title" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "prompt",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ input.__class__.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'] }}",
    ],
)
def test_template_injection_cannot_reach_python(client: Any, api_key: str, prompt: str) -> None:
    make_template(client, api_key, name="evil", prompt=prompt)
    response = client.post("/v1/templates/evil/jobs", json={"x": 1}, headers=auth(api_key))
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "refused" in message and "unsafe" in message  # the sandbox stopped it
    assert "<module" not in message and "<built-in" not in message


def test_bad_templates_are_refused(client: Any, api_key: str) -> None:
    syntax = client.post(
        "/v1/templates", json={"name": "t", "prompt": "{{ oops"}, headers=auth(api_key)
    )
    assert syntax.status_code == 422 and "prompt" in syntax.json()["error"]["message"]
    bad_name = client.post(
        "/v1/templates", json={"name": "a b", "prompt": "x"}, headers=auth(api_key)
    )
    assert bad_name.status_code == 422 and "name" in bad_name.json()["error"]["message"]
    make_template(client, api_key, name="twice")
    again = client.post(
        "/v1/templates", json={"name": "twice", "prompt": "x"}, headers=auth(api_key)
    )
    assert again.status_code == 409
    missing = client.post("/v1/templates/nope/jobs", json={}, headers=auth(api_key))
    assert missing.status_code == 404
