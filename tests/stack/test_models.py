"""GET /v1/models, GET /v1/models/{id} and POST /v1/messages/count_tokens: the simulator
serves them as Anthropic does, and promptq answers from the upstream's list (or, without
one, from its price and limit tables) and passes token counting through, not as a job."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from fastapi.testclient import TestClient
from helpers import auth
from pydantic import SecretStr

from api.app import create_app
from promptq.catalog import ModelInfo, display_name, models_from_tables, page_of
from promptq.config import Settings
from promptq.pricing import PriceTable
from promptq.ratelimit.table import LimitTable
from promptq.simulator import Simulator, SimulatorConfig
from promptq.simulator.catalog import MODELS as SIMULATED
from promptq.simulator.catalog import list_page

KEY = "sk-models-test"


# ---------------------------------------------------------------------------------------
# The simulator, over HTTP


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(api_key=KEY)) as server:
        yield server


def sim_get(sim: Simulator, path: str, **params: Any) -> requests.Response:
    return requests.get(f"{sim.url}{path}", params=params, headers={"x-api-key": KEY}, timeout=5)


def test_the_simulator_lists_models_newest_first_in_pages(sim: Simulator) -> None:
    whole = sim_get(sim, "/v1/models").json()
    ids = [m["id"] for m in whole["data"]]
    assert ids == [m["id"] for m in SIMULATED] and whole["has_more"] is False
    assert whole["first_id"] == ids[0] and whole["last_id"] == ids[-1]
    dates = [m["created_at"] for m in whole["data"]]
    assert dates == sorted(dates, reverse=True)
    assert all(m["type"] == "model" and m["display_name"] for m in whole["data"])

    first = sim_get(sim, "/v1/models", limit=3).json()
    assert [m["id"] for m in first["data"]] == ids[:3] and first["has_more"] is True
    second = sim_get(sim, "/v1/models", limit=3, after_id=first["last_id"]).json()
    assert [m["id"] for m in second["data"]] == ids[3:6]
    back = sim_get(sim, "/v1/models", limit=2, before_id=second["first_id"]).json()
    assert [m["id"] for m in back["data"]] == ids[1:3] and back["has_more"] is True

    assert sim_get(sim, f"/v1/models/{ids[1]}").json() == whole["data"][1]
    missing = sim_get(sim, "/v1/models/claude-nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert requests.get(f"{sim.url}/v1/models", timeout=5).status_code == 401
    assert sim_get(sim, "/v1/models", limit=0).status_code == 400


def test_the_simulator_counts_tokens_as_it_charges_them(sim: Simulator) -> None:
    prompt = {"system": "Be brief.", "messages": [{"role": "user", "content": "x" * 400}]}
    # The module's simulator is shared: other tests of it (run before this one when pytest
    # groups tests by database) count tokens through promptq.
    before = sim.stats()["calls_by_endpoint"].get("count_tokens", 0)
    counted = requests.post(
        f"{sim.url}/v1/messages/count_tokens",
        json={"model": "claude-haiku-4-5", **prompt},
        headers={"x-api-key": KEY},
        timeout=5,
    )
    assert counted.status_code == 200
    message = requests.post(
        f"{sim.url}/v1/messages",
        json={"model": "claude-haiku-4-5", "max_tokens": 5, **prompt},
        headers={"x-api-key": KEY},
        timeout=5,
    ).json()
    assert counted.json() == {"input_tokens": message["usage"]["input_tokens"]}
    # count_tokens takes no max_tokens, and refuses what /v1/messages would.
    bad = requests.post(
        f"{sim.url}/v1/messages/count_tokens",
        json={"model": "claude-haiku-4-5", "max_tokens": 5, **prompt},
        headers={"x-api-key": KEY},
        timeout=5,
    )
    assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]
    assert sim.stats()["calls_by_endpoint"]["count_tokens"] == before + 2


# ---------------------------------------------------------------------------------------
# The catalog's own rules (no processes)


def test_display_names_follow_anthropics() -> None:
    assert display_name("claude-sonnet-4-6") == "Claude Sonnet 4.6"
    assert display_name("claude-3-5-haiku-20241022") == "Claude 3.5 Haiku 20241022"
    assert display_name("claude-opus-4") == "Claude Opus 4"


def test_the_tables_name_models_by_their_plain_patterns() -> None:
    limits = LimitTable.from_toml('[models."my-model*"]\nrpm = 5\n')
    prices = PriceTable.from_toml('[models."claude-sonnet-4-6*"]\ninput = 1\noutput = 2\n')
    limit_patterns = [entry.pattern for entry in limits.entries()]
    ids = [m.id for m in models_from_tables(prices.patterns(), limit_patterns)]
    assert "claude-sonnet-4-6" in ids and "claude-haiku-4-5" in ids and "my-model" in ids
    assert len(ids) == len(set(ids))
    # Families and wildcards name no model.
    assert not [i for i in ids if i.endswith("-") or "*" in i or "[" in i or not i]


def test_paging_keeps_the_lists_order_both_ways() -> None:
    models = [ModelInfo(f"m{n}", f"M {n}", datetime(2026, 1, 1, tzinfo=UTC)) for n in range(5)]
    assert [m.id for m in page_of(models, 2, None, None).models] == ["m0", "m1"]
    page = page_of(models, 2, "m3", None)
    assert [m.id for m in page.models] == ["m4"] and page.has_more is False
    page = page_of(models, 10, None, "m2")
    assert [m.id for m in page.models] == ["m0", "m1"] and page.has_more is False


# ---------------------------------------------------------------------------------------
# promptq's API


@pytest.fixture
def models_client(settings: Settings, sim: Simulator) -> Iterator[TestClient]:
    """The API with the module's simulator (its own list and stats) as upstream."""
    sim.configure(list_models=True)
    sim.reset()
    upstream = {"upstream_url": sim.url, "upstream_api_key": SecretStr(KEY)}
    local = settings.model_copy(update=upstream)
    with TestClient(create_app(local)) as test_client:
        yield test_client


def test_models_come_from_the_upstreams_list_in_anthropics_shape(
    models_client: TestClient, api_key: str, sim: Simulator
) -> None:
    listed = models_client.get("/v1/models", headers=auth(api_key))
    assert listed.status_code == 200
    assert listed.json() == list_page({})  # the simulator's own first page

    page = models_client.get("/v1/models?limit=2", headers={"x-api-key": api_key}).json()
    assert page["has_more"] is True and len(page["data"]) == 2
    rest = models_client.get(
        f"/v1/models?limit=1000&after_id={page['last_id']}", headers=auth(api_key)
    ).json()
    assert [m["id"] for m in page["data"] + rest["data"]] == [m["id"] for m in SIMULATED]
    one = models_client.get(f"/v1/models/{SIMULATED[0]['id']}", headers=auth(api_key))
    assert one.json() == SIMULATED[0]
    # The list is fetched once (a model picker opening is not an upstream call each time).
    assert sim.stats()["calls_by_endpoint"]["models"] == 1


def test_models_errors_are_anthropics_and_say_what_to_do(
    models_client: TestClient, api_key: str
) -> None:
    missing = models_client.get("/v1/models/claude-nothing-9", headers=auth(api_key))
    assert missing.status_code == 404
    body = missing.json()
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert "claude-nothing-9" in body["error"]["message"]
    assert "GET /v1/models" in body["error"]["message"]
    cursor = models_client.get("/v1/models?after_id=nope", headers=auth(api_key))
    assert cursor.status_code == 400 and "after_id" in cursor.json()["error"]["message"]
    assert models_client.get("/v1/models").status_code == 401
    assert models_client.get("/v1/models?limit=1001", headers=auth(api_key)).status_code == 400


def test_without_an_upstream_list_the_tables_models_are_offered(
    settings: Settings, api_key: str
) -> None:
    with Simulator(SimulatorConfig(list_models=False)) as bare:
        local = settings.model_copy(update={"upstream_url": bare.url})
        with TestClient(create_app(local)) as client:
            page = client.get("/v1/models?limit=1000", headers=auth(api_key)).json()
            ids = [m["id"] for m in page["data"]]
            sonnet = client.get("/v1/models/claude-sonnet-4-6", headers=auth(api_key)).json()
    assert "claude-sonnet-4-6" in ids and "claude-haiku-4-5" in ids
    assert sonnet == {
        "type": "model",
        "id": "claude-sonnet-4-6",
        "display_name": "Claude Sonnet 4.6",
        "created_at": "1970-01-01T00:00:00Z",
    }
    assert bare.stats()["calls_by_endpoint"]["models"] == 1


def test_count_tokens_is_the_upstreams_answer_and_not_a_job(
    models_client: TestClient, api_key: str, sim: Simulator
) -> None:
    jobs_before = models_client.get("/v1/jobs?limit=100", headers=auth(api_key)).json()["data"]
    body = {"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "y" * 80}]}
    counted = models_client.post("/v1/messages/count_tokens", json=body, headers=auth(api_key))
    assert counted.status_code == 200 and counted.json() == {"input_tokens": 20}
    assert sim.stats()["calls_by_endpoint"]["count_tokens"] == 1
    assert sim.stats()["calls"] == 0  # no message was made
    jobs_after = models_client.get("/v1/jobs?limit=100", headers=auth(api_key)).json()["data"]
    assert jobs_after == jobs_before

    refused = models_client.post(
        "/v1/messages/count_tokens", json={"model": "claude-sonnet-4-6"}, headers=auth(api_key)
    )
    assert refused.status_code == 400
    assert refused.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "messages: Field required"},
    }
    not_json = models_client.post(
        "/v1/messages/count_tokens", content=b"[1]", headers=auth(api_key)
    )
    assert not_json.status_code == 400 and not_json.json()["type"] == "error"
    assert models_client.post("/v1/messages/count_tokens", json=body).status_code == 401


def test_count_tokens_says_when_the_upstream_cannot_count(settings: Settings, api_key: str) -> None:
    from promptq.supervisor import free_port

    local = settings.model_copy(update={"upstream_url": f"http://127.0.0.1:{free_port()}"})
    with TestClient(create_app(local)) as client:
        answer = client.post(
            "/v1/messages/count_tokens",
            json={"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "hi"}]},
            headers=auth(api_key),
        )
    assert answer.status_code == 502
    error = answer.json()["error"]
    assert error["type"] == "api_error" and "gave no answer" in error["message"]
    assert "PROMPTQ_UPSTREAM_URL" in error["message"]
