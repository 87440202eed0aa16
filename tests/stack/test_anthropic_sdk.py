"""The official `anthropic` SDK, pointed at a running promptq API, works unchanged: single
messages, error mapping, and the whole Message Batches lifecycle."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
import requests
from helpers import Receiver, auth, running_api
from standardwebhooks.webhooks import Webhook

from promptq.db import session_scope
from promptq.keys.service import create_key

MODEL = "claude-sonnet-4-6"


@pytest.fixture(scope="module")
def api_url(
    test_env: dict[str, str], worker_process: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real `promptq api` process, shared by this module's tests."""
    with running_api(test_env, tmp_path_factory.mktemp("sdk-api") / "api.log") as url:
        yield url


@pytest.fixture(scope="module")
def signed_key(database_url: str, test_env: dict[str, str]) -> tuple[str, str]:
    with session_scope(database_url) as session:
        created = create_key(session, "sdk")
        return created.key, created.webhook_secret


@pytest.fixture(scope="module")
def key(signed_key: tuple[str, str]) -> str:
    return signed_key[0]


@pytest.fixture(scope="module")
def sdk(api_url: str, key: str) -> anthropic.Anthropic:
    # No SDK retries: each test sees promptq's own answer.
    return anthropic.Anthropic(api_key=key, base_url=api_url, max_retries=0, timeout=60)


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def ask(sdk: anthropic.Anthropic, prompt: str, model: str = MODEL, **options: Any) -> Any:
    return sdk.messages.create(
        model=model,
        max_tokens=64,
        messages=[{"role": "user", "content": prompt}],
        **options,
    )


def test_messages_create_answers_the_upstream_message_and_records_a_job(
    sdk: anthropic.Anthropic, api_url: str, key: str
) -> None:
    response = sdk.messages.with_raw_response.create(
        model=MODEL,
        max_tokens=64,
        system="be brief",
        messages=[{"role": "user", "content": unique("hello from the SDK")}],
    )
    message = response.parse()
    assert isinstance(message, anthropic.types.Message)
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0

    job_id = response.headers["x-promptq-job-id"]
    job = requests.get(f"{api_url}/v1/jobs/{job_id}", headers=auth(key), timeout=10).json()
    assert job["status"] == "succeeded" and job["priority"] == "high"
    assert job["result"] == message.model_dump(mode="json", exclude_none=True) | {
        k: v for k, v in job["result"].items() if v is None
    }
    assert job["output_text"] == message.content[0].text
    assert job["cost"]["total"] is not None and float(job["cost"]["total"]) > 0


def test_models_list_retrieve_and_count_tokens_work_through_promptq(
    sdk: anthropic.Anthropic,
) -> None:
    from promptq.simulator.catalog import MODELS

    # The SDK follows the pages itself (`has_more`, `last_id`, `after_id`).
    listed = [model.id for model in sdk.models.list(limit=2)]
    assert listed == [model["id"] for model in MODELS]
    model = sdk.models.retrieve(MODEL)
    assert model.type == "model" and model.id == MODEL and model.display_name
    with pytest.raises(anthropic.NotFoundError):
        sdk.models.retrieve("claude-nothing-1")

    counted = sdk.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "count me " * 10}]
    )
    assert counted.input_tokens == 23  # the simulator's 4 characters a token
    with pytest.raises(anthropic.BadRequestError):
        sdk.messages.count_tokens(model=MODEL, messages=[])


def test_a_stream_carries_the_same_message_as_anthropics_events(
    sdk: anthropic.Anthropic, api_url: str, key: str
) -> None:
    prompt = unique("think, then stream")
    with sdk.messages.stream(
        model=MODEL,
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": prompt}],
    ) as stream:
        streamed_text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking and final.content[0].signature
    assert streamed_text == final.content[1].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0

    job_id = stream.response.headers["x-promptq-job-id"]
    job = requests.get(f"{api_url}/v1/jobs/{job_id}", headers=auth(key), timeout=10).json()
    assert "stream" not in job["request"]  # the upstream call itself does not stream
    assert final.model_dump(mode="json", exclude_none=True)["content"] == job["result"]["content"]

    events = [event.type for event in ask(sdk, unique("raw events"), stream=True)]
    assert events == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_beta_features_reach_the_upstream_with_their_header(
    sdk: anthropic.Anthropic, api_url: str, key: str, simulator: Any
) -> None:
    prompt = unique("a beta feature, please")
    message = sdk.beta.messages.create(
        model=MODEL,
        max_tokens=32,
        betas=["context-management-2025-06-27", "interleaved-thinking-2025-05-14"],
        messages=[{"role": "user", "content": prompt}],
    )
    assert message.content[0].text
    stats = requests.get(f"{simulator.url}/_sim/stats", timeout=5).json()
    assert stats["beta_by_prompt"][prompt[:60]] == (
        "context-management-2025-06-27,interleaved-thinking-2025-05-14"
    )

    batch = sdk.beta.messages.batches.create(
        betas=["files-api-2025-04-14"], requests=[request("b", unique("beta in a batch"))]
    )
    jobs = requests.get(f"{api_url}/v1/jobs?batch={batch.id}", headers=auth(key), timeout=10)
    assert [job["anthropic_beta"] for job in jobs.json()["data"]] == ["files-api-2025-04-14"]

    with pytest.raises(anthropic.BadRequestError, match="anthropic-beta"):
        sdk.messages.create(
            model=MODEL,
            max_tokens=8,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"anthropic-beta": "not a beta name; drop table"},
        )


@pytest.mark.parametrize(
    ("call", "error_class", "status", "error_type"),
    [
        ("upstream_400", anthropic.BadRequestError, 400, "invalid_request_error"),
        ("stream_400", anthropic.BadRequestError, 400, "invalid_request_error"),
        ("invalid_params", anthropic.BadRequestError, 400, "invalid_request_error"),
        ("wrong_key", anthropic.AuthenticationError, 401, "authentication_error"),
        ("unknown_model", anthropic.NotFoundError, 404, "not_found_error"),
        ("upstream_429", anthropic.RateLimitError, 429, "rate_limit_error"),
        ("upstream_529", anthropic.OverloadedError, 529, "overloaded_error"),
    ],
)
def test_errors_reach_the_sdk_with_anthropics_status_and_shape(
    sdk: anthropic.Anthropic,
    api_url: str,
    call: str,
    error_class: type[anthropic.APIStatusError],
    status: int,
    error_type: str,
) -> None:
    calls = {
        "upstream_400": lambda: ask(sdk, unique("[[sim:400]]")),
        "stream_400": lambda: ask(sdk, unique("[[sim:400]]"), stream=True),
        "invalid_params": lambda: sdk.messages.create(
            model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "x"}]
        ),
        "wrong_key": lambda: ask(
            anthropic.Anthropic(api_key="pq_not_a_key", base_url=api_url, max_retries=0),
            "hello",
        ),
        "unknown_model": lambda: ask(sdk, unique("who are you"), model="gpt-4o"),
        # Models of their own, so the pause a 429 sets slows no other test.
        "upstream_429": lambda: ask(sdk, unique("[[sim:429 x10]]"), model="claude-sdk-429"),
        "upstream_529": lambda: ask(sdk, unique("[[sim:529 x10]]"), model="claude-sdk-529"),
    }
    with pytest.raises(error_class) as raised:
        calls[call]()
    assert raised.value.status_code == status
    body = raised.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == error_type and body["error"]["message"]


def wait_until_ended(sdk: anthropic.Anthropic, batch_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = sdk.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} did not end: {batch}")


def request(custom_id: str, prompt: str, **params: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "params": {
            "model": MODEL,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": prompt}],
            **params,
        },
    }


def test_a_batch_runs_to_its_end_and_its_results_come_back_as_jsonl(
    sdk: anthropic.Anthropic, api_url: str, key: str
) -> None:
    batch = sdk.messages.batches.create(
        requests=[
            request("first", unique("one")),
            request("second", unique("two")),
            request("refused-upstream", unique("[[sim:400]]")),
            request("invalid-params", "x", max_tokens=0),
        ]
    )
    assert batch.type == "message_batch" and batch.id.startswith("msgbatch_")
    assert batch.processing_status == "in_progress" and batch.results_url is None
    assert batch.request_counts.processing + batch.request_counts.errored == 4

    ended = wait_until_ended(sdk, batch.id)
    assert ended.ended_at is not None and ended.results_url.endswith(f"{batch.id}/results")
    counts = ended.request_counts
    assert (counts.processing, counts.succeeded, counts.errored) == (0, 2, 2)
    assert (counts.canceled, counts.expired) == (0, 0)

    results = {line.custom_id: line.result for line in sdk.messages.batches.results(batch.id)}
    assert set(results) == {"first", "second", "refused-upstream", "invalid-params"}
    assert results["first"].type == "succeeded" and results["first"].message.content[0].text
    assert results["refused-upstream"].type == "errored"
    assert results["refused-upstream"].error.error.type == "invalid_request_error"
    assert "max_tokens" in results["invalid-params"].error.error.message

    # Its requests are ordinary jobs: visible, priced, at low priority.
    listed = requests.get(f"{api_url}/v1/jobs?batch={batch.id}", headers=auth(key), timeout=10)
    mine = listed.json()["data"]
    assert len(mine) == 4 and {job["priority"] for job in mine} == {"low"}
    assert {job["batch"]["id"] for job in mine} == {batch.id}
    outside = requests.get(f"{api_url}/v1/jobs?batch=none&limit=100", headers=auth(key), timeout=10)
    assert not any(job["batch"] for job in outside.json()["data"])
    first = next(job for job in mine if job["batch"]["custom_id"] == "first")
    assert first["cost"]["total"] is not None

    listed = [b.id for b in sdk.messages.batches.list(limit=100)]
    assert batch.id in listed
    deleted = sdk.messages.batches.delete(batch.id)
    assert deleted.id == batch.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.batches.retrieve(batch.id)


def test_canceling_a_batch_cancels_what_has_not_started(sdk: anthropic.Anthropic) -> None:
    # Slow requests, more than the test worker runs at once, so most are still queued.
    batch = sdk.messages.batches.create(
        requests=[request(f"r{i}", unique(f"[[sim:latency=2]] {i}")) for i in range(40)]
    )
    with pytest.raises(anthropic.BadRequestError, match="cancel it first"):
        sdk.messages.batches.delete(batch.id)
    canceled = sdk.messages.batches.cancel(batch.id)
    assert canceled.processing_status in ("canceling", "ended")
    assert canceled.cancel_initiated_at is not None

    ended = wait_until_ended(sdk, batch.id)
    counts = ended.request_counts
    assert counts.canceled > 0 and counts.processing == 0
    assert counts.canceled + counts.succeeded == 40
    kinds = [line.result.type for line in sdk.messages.batches.results(batch.id)]
    assert len(kinds) == 40 and kinds.count("canceled") == counts.canceled
    sdk.messages.batches.delete(batch.id)


def test_batch_creation_is_refused_when_its_shape_is_wrong(sdk: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="used twice"):
        sdk.messages.batches.create(requests=[request("same", "a"), request("same", "b")])
    with pytest.raises(anthropic.BadRequestError, match="custom_id"):
        sdk.messages.batches.create(requests=[request("no spaces allowed", "a")])
    with pytest.raises(anthropic.BadRequestError, match="requests"):
        sdk.messages.batches.create(requests=[])
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.batches.retrieve("msgbatch_missing")


def test_batch_ended_is_a_signed_webhook_event(
    sdk: anthropic.Anthropic, api_url: str, signed_key: tuple[str, str]
) -> None:
    key, secret = signed_key
    receiver = Receiver()
    try:
        hook = requests.post(
            f"{api_url}/v1/webhooks",
            json={"url": receiver.url, "events": ["batch.ended"]},
            headers=auth(key),
            timeout=10,
        ).json()
        batch = sdk.messages.batches.create(requests=[request("only", unique("ping"))])
        receiver.wait_for(1)
        headers, body, _ = receiver.requests[0]
        event = Webhook(secret).verify(body, headers)
        assert event["type"] == "batch.ended" and event["data"]["id"] == batch.id
        assert event["data"]["request_counts"]["succeeded"] == 1
        requests.delete(f"{api_url}/v1/webhooks/{hook['id']}", headers=auth(key), timeout=10)
    finally:
        receiver.server.shutdown()


def test_every_url_handed_out_is_built_on_the_public_url(
    test_env: dict[str, str], worker_process: Any, make_key: Any, tmp_path: Path
) -> None:
    """Behind a proxy, receivers and clients must get promptq's public address: in the
    batch.ended webhook (no request to take it from) and in the API's own answers."""
    public = "https://promptq.example.com"
    env = {**test_env, "PROMPTQ_PUBLIC_URL": public}
    key = make_key("public-url")
    receiver = Receiver()
    try:
        with running_api(env, tmp_path / "api.log") as url:
            requests.post(
                f"{url}/v1/webhooks",
                json={"url": receiver.url, "events": ["batch.ended"]},
                headers=auth(key),
                timeout=10,
            ).raise_for_status()
            # One request that can never run: the batch ends at creation, in the API process.
            never = {
                "model": MODEL,
                "max_tokens": 0,
                "messages": [{"role": "user", "content": "x"}],
            }
            created = requests.post(
                f"{url}/v1/messages/batches",
                json={"requests": [{"custom_id": "never", "params": never}]},
                headers=auth(key),
                timeout=10,
            ).json()
            results_url = f"{public}/v1/messages/batches/{created['id']}/results"
            assert created["processing_status"] == "ended"
            assert created["results_url"] == results_url
            receiver.wait_for(1)
        _, body, _ = receiver.requests[0]
        event = json.loads(body)
        assert event["type"] == "batch.ended" and event["data"]["results_url"] == results_url
    finally:
        receiver.server.shutdown()


def test_batches_page_like_anthropics(api_url: str, make_key: Any) -> None:
    fresh = anthropic.Anthropic(api_key=make_key("pager"), base_url=api_url, max_retries=0)
    made = [
        fresh.messages.batches.create(requests=[request("x", "[[sim:400]]")]).id for _ in range(3)
    ]
    page = fresh.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2] and page.has_more
    assert [b.id for b in fresh.messages.batches.list(limit=2)] == made[::-1]  # auto-paging
    newer = fresh.messages.batches.list(limit=5, before_id=made[0])
    assert [b.id for b in newer.data] == made[:0:-1]


@pytest.fixture
def impatient_api(test_env: dict[str, str], worker_process: Any, tmp_path: Path) -> Iterator[str]:
    """An API that waits only 1.5 s for a /v1/messages job to start."""
    env = {**test_env, "PROMPTQ_MESSAGES_WAIT_SECONDS": "1.5"}
    with running_api(env, tmp_path / "api.log") as url:
        yield url


def test_a_request_that_cannot_start_in_time_or_is_abandoned_is_canceled(
    impatient_api: str, api_url: str, make_key: Any
) -> None:
    # One request a minute for this key: the first runs, the next must wait a minute.
    key = make_key("slow-key", rpm=1)
    sdk = anthropic.Anthropic(api_key=key, base_url=impatient_api, max_retries=0)
    ask(sdk, unique("first"))
    with pytest.raises(anthropic.OverloadedError) as raised:
        ask(sdk, unique("second"))
    job_id = raised.value.response.headers["x-promptq-job-id"]
    job = requests.get(f"{impatient_api}/v1/jobs/{job_id}", headers=auth(key), timeout=10).json()
    assert job["status"] == "canceled" and job["attempts"] == 0

    # A client that hangs up while its request waits cancels it too (this API would wait
    # ten minutes for it to start).
    with pytest.raises(requests.ReadTimeout):
        requests.post(
            f"{api_url}/v1/messages",
            json={"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]},
            headers={"x-api-key": key},
            timeout=0.5,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        jobs = requests.get(f"{impatient_api}/v1/jobs", headers=auth(key), timeout=10).json()
        if jobs["data"][0]["id"] != job_id and jobs["data"][0]["status"] == "canceled":
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the abandoned request was not canceled: {jobs['data'][0]}")
