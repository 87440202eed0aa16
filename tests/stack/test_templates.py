"""Prompt templates as triggers: any webhook source's JSON fills a Jinja2 template rendered
in the sandbox; a missing variable is a 422 that names it; injection cannot reach Python."""

from __future__ import annotations

import time
from typing import Any

import pytest
from helpers import auth, wait_for_status

from promptq.testing import FINAL


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


# ---------------------------------------------------------------- hostile templates (issue 13)


@pytest.fixture
def bounded_client(settings: Any) -> Any:
    """The API with small template limits, so that each is reached in a moment."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    configured = settings.model_copy(
        update={
            "template_max_ms": 500,
            "template_max_bytes": 100_000,
            "template_max_source_bytes": 10_000,
        }
    )
    with TestClient(create_app(configured)) as test_client:
        yield test_client


def render_error(client: Any, key: str, prompt: str) -> str:
    """Create a template (which must be accepted: its syntax is fine) and render it; the
    render must be a 422, whose message is returned."""
    make_template(client, key, name="bomb", prompt=prompt)
    response = client.post("/v1/templates/bomb/jobs", json={"n": 3}, headers=auth(key))
    assert response.status_code == 422, response.text
    return str(response.json()["error"]["message"])


@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ("{{ 'x' * 200000 }}", "PROMPTQ_TEMPLATE_MAX_BYTES"),
        ("{{ 'x' * n * 100000 }}", "PROMPTQ_TEMPLATE_MAX_BYTES"),
        ("{{ [1, 2] * 100000 }}", "PROMPTQ_TEMPLATE_MAX_BYTES"),
        ("{{ 2 ** 300000 }}", "bits"),
        ("{{ '%200000s' % 'x' }}", "PROMPTQ_TEMPLATE_MAX_BYTES"),
        ("{% for i in range(50000) %}{{ 'abc' }}{% endfor %}", "PROMPTQ_TEMPLATE_MAX_BYTES"),
        ("{{ 'x'|center(200000) }}", "PROMPTQ_TEMPLATE_MAX_BYTES"),
        (
            "{% for i in range(100000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
            "PROMPTQ_TEMPLATE_MAX_MS",
        ),
        ("{{ range(10 ** 30) }}", "OverflowError"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ],
)
def test_a_template_cannot_take_more_than_its_limits(
    bounded_client: Any, api_key: str, prompt: str, says: str
) -> None:
    """Every way a template can ask for too much time or memory, or fail while rendering,
    is a 422 that names the limit or the error, never a 500 or a frozen API."""
    message = render_error(bounded_client, api_key, prompt)
    assert says in message and "template 'bomb'" in message, message


def test_the_template_source_has_a_size_limit(bounded_client: Any, api_key: str) -> None:
    response = bounded_client.post(
        "/v1/templates", json={"name": "big", "prompt": "x" * 20_000}, headers=auth(api_key)
    )
    assert response.status_code == 422
    assert "PROMPTQ_TEMPLATE_MAX_SOURCE_BYTES" in response.json()["error"]["message"]


def test_constant_expressions_are_not_folded_while_compiling() -> None:
    """Jinja's optimizer would compute `'x' * 10**9` at compile time, on the thread that
    compiles: the intercepted operators are left for the render, where they are checked."""
    from promptq.template_sandbox import _Bounded

    source = _Bounded(1000).compile("{{ 'x' * 10 ** 3 }}", raw=True)
    assert "call_binop" in source and "x" * 1000 not in source


def test_a_slow_render_does_not_hold_the_event_loop(
    test_env: dict[str, str], make_key: Any, tmp_path: Any
) -> None:
    """A real API process: while one request renders a template that runs for seconds,
    another request is answered."""
    import threading

    import requests
    from helpers import running_api

    key = make_key()
    env = {**test_env, "PROMPTQ_TEMPLATE_MAX_MS": "3000"}
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with running_api(env, tmp_path / "api.log") as url:
        created = requests.post(
            f"{url}/v1/templates", json={"name": "slow", "prompt": slow}, headers=auth(key)
        )
        assert created.status_code == 201, created.text
        finished = threading.Event()
        outcome: dict[str, Any] = {}

        def render() -> None:
            outcome["response"] = requests.post(
                f"{url}/v1/templates/slow/jobs", json={}, headers=auth(key), timeout=60
            )
            finished.set()

        thread = threading.Thread(target=render)
        thread.start()
        try:
            time.sleep(0.5)  # the render has begun
            assert requests.get(f"{url}/healthz", timeout=60).status_code == 200
            assert not finished.is_set(), "the health check waited for the render"
        finally:
            thread.join()
        assert outcome["response"].status_code == 422
        assert "PROMPTQ_TEMPLATE_MAX_MS" in outcome["response"].json()["error"]["message"]
