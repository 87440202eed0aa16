"""A key with a monthly budget may send only what promptq can price: a model without a
price, beta features, server tools and request fields promptq does not know are refused at
intake (403, saying what to do), on every path that makes jobs; a key without a budget may
send them all."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from helpers import auth


@pytest.fixture
def client(quiet_api: Any) -> Any:
    # No worker runs what these tests accept.
    return quiet_api()


def request(model: str = "claude-sonnet-4-6", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hello"}],
        **extra,
    }


def refused(response: Any, *words: str) -> None:
    assert response.status_code == 403, response.text
    message = response.json()["error"]["message"]
    assert response.json()["error"]["type"] == "permission_error"
    assert all(word in message for word in words), message


def test_a_budgeted_key_may_not_run_a_model_without_a_price(client: Any, make_key: Any) -> None:
    budgeted = make_key("budgeted", monthly_budget_usd=Decimal(5))
    free = make_key("unbudgeted")
    job = {"request": request("mystery-model-1")}
    refused(
        client.post("/v1/jobs", json=job, headers=auth(budgeted)),
        "mystery-model-1",
        "PROMPTQ_PRICING_FILE",
    )
    assert client.post("/v1/jobs", json=job, headers=auth(free)).status_code == 202
    assert (
        client.post("/v1/jobs", json={"request": request()}, headers=auth(budgeted)).status_code
        == 202
    )
    # The SDK's path, in Anthropic's shape.
    message = client.post("/v1/messages", json=request("mystery-model-1"), headers=auth(budgeted))
    assert message.status_code == 403 and message.json()["type"] == "error"


@pytest.mark.parametrize(
    ("extra", "headers", "words"),
    [
        ({}, {"anthropic-beta": "context-1m-2025-08-07"}, ["beta features", "context-1m"]),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            {},
            ["server tool", "web_search_20250305"],
        ),
        ({"service_tier": "auto"}, {}, ["service_tier"]),
    ],
)
def test_a_budgeted_key_may_not_send_what_promptq_cannot_price(
    client: Any, make_key: Any, extra: dict[str, Any], headers: dict[str, str], words: list[str]
) -> None:
    budgeted = make_key("budgeted", monthly_budget_usd=Decimal(5))
    free = make_key("unbudgeted")
    job = {"request": request(**extra)}
    refused(client.post("/v1/jobs", json=job, headers={**auth(budgeted), **headers}), *words)
    assert client.post("/v1/jobs", json=job, headers={**auth(free), **headers}).status_code == 202


def test_a_batch_names_the_request_promptq_cannot_price(client: Any, make_key: Any) -> None:
    budgeted = make_key("budgeted", monthly_budget_usd=Decimal(5))
    batch = {
        "requests": [
            {"custom_id": "fine", "params": request()},
            {"custom_id": "unpriced", "params": request("mystery-model-2")},
        ]
    }
    refused(
        client.post("/v1/messages/batches", json=batch, headers=auth(budgeted)),
        "custom_id=unpriced",
        "mystery-model-2",
    )
    assert client.get("/v1/messages/batches", headers=auth(budgeted)).json()["data"] == []


def test_a_job_that_could_cost_more_than_is_left_is_refused_at_intake(
    client: Any, make_key: Any
) -> None:
    # $0.01 left: Sonnet's output is $15 a million tokens, so 4,096 tokens could cost $0.061.
    budgeted = make_key("nearly-spent", monthly_budget_usd=Decimal("0.01"))
    big = {"request": {**request(), "max_tokens": 4096}}
    refused = client.post("/v1/jobs", json=big, headers=auth(budgeted))
    assert refused.status_code == 402, refused.text
    message = refused.json()["error"]["message"]
    assert "could cost up to" in message and "lower max_tokens" in message
    assert (
        client.post("/v1/jobs", json={"request": request()}, headers=auth(budgeted)).status_code
        == 202
    )
    batch = {"requests": [{"custom_id": "big", "params": big["request"]}]}
    assert (
        client.post("/v1/messages/batches", json=batch, headers=auth(budgeted)).status_code == 402
    )
