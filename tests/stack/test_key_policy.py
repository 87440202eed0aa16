"""What the operator lets one key do: an allowlist of models (`promptq keys create NAME
--models ...`, `keys update`), enforced on jobs, messages, batches and template jobs, and
the key's own quotas; a change reaches every API process within a second."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import pytest
from helpers import auth, run_promptq


@pytest.fixture
def client(quiet_api: Any) -> Any:
    return quiet_api()


def keys(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_promptq("keys", *args, env={**os.environ, **env}, check=check)


def job(model: str) -> dict[str, Any]:
    return {"prompt": "hello", "model": model}


def eventually(condition: Any, seconds: float = 1.0) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "not within the time allowed"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_key_may_use_only_the_models_it_is_allowed(
    client: Any, quiet_env: dict[str, str]
) -> None:
    created = json.loads(
        keys(quiet_env, "create", "haiku-only", "--models", "claude-haiku-*", "--json").stdout
    )
    key = created["key"]
    # Model pickers (n8n's) list only what the key may use.
    listed = client.get("/v1/models?limit=100", headers=auth(key)).json()["data"]
    assert listed and all(model["id"].startswith("claude-haiku-") for model in listed)
    refused = client.post("/v1/jobs", json=job("claude-sonnet-4-6"), headers=auth(key))
    assert refused.status_code == 403
    message = refused.json()["error"]["message"]
    assert "claude-sonnet-4-6" in message and "claude-haiku-*" in message
    assert (
        client.post("/v1/jobs", json=job("claude-haiku-4-5"), headers=auth(key)).status_code == 202
    )
    sdk = client.post(
        "/v1/messages",
        json={
            "model": "claude-opus-4-7",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
        },
        headers=auth(key),
    )
    assert sdk.status_code == 403 and sdk.json()["error"]["type"] == "permission_error"
    batch = {
        "requests": [
            {
                "custom_id": "sonnet-one",
                "params": {
                    "model": "claude-sonnet-4-6",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "x"}],
                },
            }
        ]
    }
    batched = client.post("/v1/messages/batches", json=batch, headers=auth(key))
    assert batched.status_code == 403 and "sonnet-one" in batched.json()["error"]["message"]
    template = {"name": "greet", "prompt": "Hi {{ who }}", "model": "claude-sonnet-4-6"}
    assert client.post("/v1/templates", json=template, headers=auth(key)).status_code == 201
    from_template = client.post("/v1/templates/greet/jobs", json={"who": "x"}, headers=auth(key))
    assert from_template.status_code == 403

    # The operator widens it; the API (which had the key cached) applies it within a second.
    keys(quiet_env, "update", "haiku-only", "--models", "claude-haiku-*,claude-sonnet-*")
    eventually(
        lambda: (
            client.post("/v1/jobs", json=job("claude-sonnet-4-6"), headers=auth(key)).status_code
            == 202
        )
    )
    listed = json.loads(keys(quiet_env, "list", "--json").stdout)
    [row] = [r for r in listed if r["name"] == "haiku-only"]
    assert row["models"] == ["claude-haiku-*", "claude-sonnet-*"]
    keys(quiet_env, "update", "haiku-only", "--all-models")
    eventually(
        lambda: (
            client.post("/v1/jobs", json=job("claude-opus-4-7"), headers=auth(key)).status_code
            == 202
        )
    )


def test_a_key_may_have_its_own_quotas(client: Any, quiet_env: dict[str, str]) -> None:
    created = json.loads(
        keys(quiet_env, "create", "small", "--quota", "unfinished_jobs=1", "--json").stdout
    )
    key = created["key"]
    assert (
        client.post("/v1/jobs", json=job("claude-haiku-4-5"), headers=auth(key)).status_code == 202
    )
    second = client.post("/v1/jobs", json=job("claude-haiku-4-5"), headers=auth(key))
    assert second.status_code == 429 and "own quota" in second.json()["error"]["message"]
    keys(quiet_env, "update", "small", "--default-quota", "unfinished_jobs")
    eventually(
        lambda: (
            client.post("/v1/jobs", json=job("claude-haiku-4-5"), headers=auth(key)).status_code
            == 202
        )
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["create", "x", "--models", ""], ["--models", "no empty ones"]),
        (["create", "x", "--models", "a,,b"], ["no empty ones"]),
        (["create", "x", "--quota", "speed=3"], ["NAME=VALUE", "unfinished_jobs"]),
        (["create", "x", "--quota", "templates=2.5"], ["whole number"]),
        (["create", "x", "--quota", "templates=0"], ["more than 0"]),
        (["update", "nobody", "--rpm", "5"], ["no key with id or name"]),
        (["update", "x", "--rpm", "5", "--no-rpm"], ["contradict"]),
        (["update", "x"], ["nothing to change"]),
    ],
)
def test_bad_policy_input_is_refused_with_what_to_do(
    quiet_env: dict[str, str], args: list[str], words: list[str]
) -> None:
    result = keys(quiet_env, *args, check=False)
    assert result.returncode != 0
    assert all(word in result.stderr for word in words), result.stderr
