"""The upstream simulator, over real HTTP, as promptq and the benchmarks meet it."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest
import requests

from promptq.simulator import Simulator, SimulatorConfig, parse_directives

KEY = {"x-api-key": "sk-sim-test"}
MODEL = "claude-sonnet-4-5-20250929"


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator() as simulator:
        yield simulator


def unique(text: str) -> str:
    """A prompt no other test sends, so directive counters and caches never collide."""
    return f"{text} ({uuid.uuid4().hex[:8]})"


def request_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": prompt}],
        **extra,
    }


def post(sim: Simulator, body: Any, headers: dict[str, str] | None = None) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(
        f"{sim.url}/v1/messages",
        data=data,
        headers={"content-type": "application/json", **(KEY if headers is None else headers)},
        timeout=10,
    )


def error_of(response: requests.Response) -> tuple[str, str]:
    payload = response.json()
    assert payload["type"] == "error"
    return payload["error"]["type"], payload["error"]["message"]


# --- a good call ----------------------------------------------------------------------------


def test_a_good_call_has_the_shape_of_an_anthropic_message(sim: Simulator) -> None:
    prompt = unique("What is the capital of France?")
    response = post(sim, request_body(prompt))

    assert response.status_code == 200
    assert response.headers["request-id"].startswith("req_")
    message = response.json()
    assert message["id"].startswith("msg_") and len(message["id"]) == 4 + 24
    assert message["type"] == "message"
    assert message["role"] == "assistant"
    assert message["model"] == MODEL
    assert message["stop_reason"] == "end_turn"
    assert message["stop_sequence"] is None
    [block] = message["content"]
    assert block["type"] == "text"
    assert prompt in block["text"]
    usage = message["usage"]
    assert usage == {
        "input_tokens": math.ceil(len(prompt) / 4),
        "output_tokens": math.ceil(len(block["text"]) / 4),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def test_replies_are_deterministic_and_depend_on_the_prompt(sim: Simulator) -> None:
    def text(prompt: str) -> str:
        return str(post(sim, request_body(prompt)).json()["content"][0]["text"])

    assert text("Tell me about owls.") == text("Tell me about owls.")
    assert text("Tell me about owls.") != text("Tell me about cats.")


def test_the_echo_is_cut_to_eighty_characters(sim: Simulator) -> None:
    prompt = "x" * 79 + "END" + "y" * 200
    reply = post(sim, request_body(prompt)).json()["content"][0]["text"]
    assert "x" * 79 + "E" in reply
    assert "END" not in reply


def test_usage_grows_with_the_text_and_counts_the_system_prompt(sim: Simulator) -> None:
    short = post(sim, request_body("Hi")).json()["usage"]
    long = post(sim, request_body("Hi " * 400)).json()["usage"]
    with_system = post(sim, request_body("Hi", system="You are terse. " * 20)).json()["usage"]

    assert short["input_tokens"] == 1
    assert long["input_tokens"] == math.ceil(len("Hi " * 400) / 4)
    assert with_system["input_tokens"] == math.ceil((2 + len("You are terse. " * 20)) / 4)
    assert long["output_tokens"] > short["output_tokens"]


def test_thinking_comes_first_with_a_signature(sim: Simulator) -> None:
    body = request_body(
        "Are there infinitely many primes p with p mod 4 == 3?",
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    message = post(sim, body).json()

    thinking, text = message["content"]
    assert thinking["type"] == "thinking"
    assert thinking["thinking"] and thinking["signature"]
    assert text["type"] == "text"
    chars = len(thinking["thinking"]) + len(text["text"])
    assert message["usage"]["output_tokens"] == math.ceil(chars / 4)


def test_max_tokens_truncates_the_reply(sim: Simulator) -> None:
    message = post(sim, request_body(unique("Write me a long story"), max_tokens=3)).json()

    assert message["stop_reason"] == "max_tokens"
    assert message["usage"]["output_tokens"] == 3
    assert len(message["content"][0]["text"]) == 12


def test_a_stop_sequence_ends_the_reply(sim: Simulator) -> None:
    message = post(sim, request_body("Say something", stop_sequences=["You said"])).json()

    assert message["stop_reason"] == "stop_sequence"
    assert message["stop_sequence"] == "You said"
    assert "You said" not in message["content"][0]["text"]


def test_cache_control_writes_the_prefix_once_then_reads_it(sim: Simulator) -> None:
    document = unique("A long reference document. ") * 40
    system = [{"type": "text", "text": document, "cache_control": {"type": "ephemeral"}}]
    cached_tokens = math.ceil(len(document) / 4)

    first = post(sim, request_body("Question one?", system=system)).json()["usage"]
    second = post(sim, request_body("Question two, longer?", system=system)).json()["usage"]

    assert first["cache_creation_input_tokens"] == cached_tokens
    assert first["cache_read_input_tokens"] == 0
    assert second["cache_creation_input_tokens"] == 0
    assert second["cache_read_input_tokens"] == cached_tokens
    assert second["input_tokens"] == math.ceil((len(document) + 21) / 4) - cached_tokens


def test_without_cache_control_nothing_is_cached(sim: Simulator) -> None:
    system = [{"type": "text", "text": unique("Plain system prompt")}]
    for _ in range(2):
        usage = post(sim, request_body("Q", system=system)).json()["usage"]
        assert usage["cache_creation_input_tokens"] == usage["cache_read_input_tokens"] == 0


def test_a_chunked_body_is_read(sim: Simulator) -> None:
    payload = json.dumps(request_body("chunked hello")).encode()
    response = requests.post(
        f"{sim.url}/v1/messages",
        data=iter([payload[:10], payload[10:]]),  # a generator body goes out chunked
        headers={"content-type": "application/json", **KEY},
        timeout=10,
    )
    assert response.status_code == 200
    assert "chunked hello" in response.json()["content"][0]["text"]


# --- validation -------------------------------------------------------------------------------

GOOD: dict[str, Any] = request_body("hello")
INVALID = [
    ("no model", {k: v for k, v in GOOD.items() if k != "model"}, "model: Field required"),
    ("model not a string", {**GOOD, "model": 3}, "model: Input should be a valid string"),
    ("no max_tokens", {k: v for k, v in GOOD.items() if k != "max_tokens"}, "max_tokens"),
    ("max_tokens zero", {**GOOD, "max_tokens": 0}, "greater than or equal to 1"),
    ("max_tokens a string", {**GOOD, "max_tokens": "10"}, "valid integer"),
    ("max_tokens a bool", {**GOOD, "max_tokens": True}, "valid integer"),
    ("no messages", {k: v for k, v in GOOD.items() if k != "messages"}, "messages: Field"),
    ("empty messages", {**GOOD, "messages": []}, "at least one message"),
    ("messages not a list", {**GOOD, "messages": "hello"}, "messages: Input should be"),
    (
        "bad role",
        {**GOOD, "messages": [{"role": "system", "content": "x"}]},
        "messages.0.role",
    ),
    (
        "content a number",
        {**GOOD, "messages": [{"role": "user", "content": 5}]},
        "messages.0.content",
    ),
    (
        "block without a type",
        {**GOOD, "messages": [{"role": "user", "content": [{"text": "x"}]}]},
        "messages.0.content.0.type",
    ),
    (
        "empty user content",
        {**GOOD, "messages": [{"role": "user", "content": ""}]},
        "non-empty content",
    ),
    ("temperature above 1", {**GOOD, "temperature": 1.5}, "temperature"),
    ("temperature below 0", {**GOOD, "temperature": -0.1}, "temperature"),
    (
        "thinking budget too small",
        {**GOOD, "max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 512}},
        "budget_tokens: Input should be greater than or equal to 1024",
    ),
    (
        "thinking budget not below max_tokens",
        {**GOOD, "max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 2000}},
        "`max_tokens` must be greater than `thinking.budget_tokens`",
    ),
    ("an unknown field", {**GOOD, "webhook_url": "http://x"}, "webhook_url: Extra inputs"),
    ("body not an object", [GOOD], "valid dictionary"),
]


@pytest.mark.parametrize(("case", "body", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_requests_get_anthropics_400(
    sim: Simulator, case: str, body: Any, message: str
) -> None:
    response = post(sim, body)
    assert response.status_code == 400, case
    error_type, text = error_of(response)
    assert error_type == "invalid_request_error"
    assert message in text
    assert response.headers["request-id"].startswith("req_")


def test_a_body_that_is_not_json_is_a_400(sim: Simulator) -> None:
    response = post(sim, b"{not json")
    assert response.status_code == 400
    assert error_of(response)[0] == "invalid_request_error"


def test_an_unknown_model_is_a_404_naming_it(sim: Simulator) -> None:
    response = post(sim, {**GOOD, "model": "gpt-4o"})
    assert response.status_code == 404
    assert error_of(response) == ("not_found_error", "model: gpt-4o")


def test_an_unknown_path_is_a_404(sim: Simulator) -> None:
    response = requests.post(f"{sim.url}/v1/complete", json=GOOD, headers=KEY, timeout=5)
    assert response.status_code == 404
    assert error_of(response)[0] == "not_found_error"


def test_an_oversized_body_is_a_413_without_reading_it(sim: Simulator) -> None:
    host, port = sim.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\n"
            b"content-type: application/json\r\ncontent-length: 50000000\r\n\r\n"
        )
        status_line = raw.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 413")


# --- authentication ---------------------------------------------------------------------------


def test_a_call_without_a_key_is_a_401(sim: Simulator) -> None:
    response = post(sim, GOOD, headers={})
    assert response.status_code == 401
    assert error_of(response)[0] == "authentication_error"


@pytest.mark.parametrize(
    "headers", [{"authorization": "Bearer sk-any"}, {"x-api-key": "sk-any"}], ids=["bearer", "x"]
)
def test_any_key_passes_when_none_is_configured(sim: Simulator, headers: dict[str, str]) -> None:
    assert post(sim, GOOD, headers=headers).status_code == 200


def test_a_configured_key_must_match() -> None:
    with Simulator(SimulatorConfig(api_key="sk-right")) as sim:
        assert post(sim, GOOD, headers={"x-api-key": "sk-wrong"}).status_code == 401
        assert post(sim, GOOD, headers={"authorization": "Bearer sk-wrong"}).status_code == 401
        assert post(sim, GOOD, headers={"authorization": "Bearer sk-right"}).status_code == 200
        assert post(sim, GOOD, headers={"x-api-key": "sk-right"}).status_code == 200


# --- directives -------------------------------------------------------------------------------

ANTHROPIC_FAULTS = [
    ("429", 429, "rate_limit_error"),
    ("500", 500, "api_error"),
    ("529", 529, "overloaded_error"),
    ("400", 400, "invalid_request_error"),
    ("401", 401, "authentication_error"),
    ("403", 403, "permission_error"),
    ("404", 404, "not_found_error"),
    ("413", 413, "request_too_large"),
]


@pytest.mark.parametrize(("fault", "status", "error_type"), ANTHROPIC_FAULTS)
def test_a_directive_fails_the_first_calls_in_anthropics_shape(
    sim: Simulator, fault: str, status: int, error_type: str
) -> None:
    body = request_body(unique(f"hello [[sim:{fault} x2]]"))
    for _ in range(2):
        response = post(sim, body)
        assert response.status_code == status
        assert error_of(response)[0] == error_type
        assert response.headers["request-id"].startswith("req_")
    assert post(sim, body).status_code == 200


def test_a_429_directive_says_when_to_retry(sim: Simulator) -> None:
    response = post(sim, request_body(unique("[[sim:429 x1]]")))
    assert response.headers["retry-after"] == "1"


PROXY_FAULTS = [
    ("502", 502, "text/html"),
    ("503", 503, "text/plain"),
    ("504", 504, "text/html"),
    ("524", 524, "text/html"),
    ("html", 502, "text/html"),
]


@pytest.mark.parametrize(("fault", "status", "content_type"), PROXY_FAULTS)
def test_proxy_faults_answer_plain_text_or_html(
    sim: Simulator, fault: str, status: int, content_type: str
) -> None:
    body = request_body(unique(f"[[sim:{fault} x1]] hello"))
    response = post(sim, body)
    assert response.status_code == status
    assert response.headers["content-type"].startswith(content_type)
    with pytest.raises(ValueError):
        response.json()
    assert post(sim, body).status_code == 200


@pytest.mark.parametrize(
    ("fault", "code"), [("openai-500", "internal_error"), ("openai-invalid", "invalid_request")]
)
def test_openai_shaped_errors(sim: Simulator, fault: str, code: str) -> None:
    response = post(sim, request_body(unique(f"[[sim:{fault} x1]]")))
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "comet_api_error"
    assert error["code"] == code
    assert error["param"] is None
    assert error["message"]


def test_empty_is_a_200_with_nothing_in_it(sim: Simulator) -> None:
    response = post(sim, request_body(unique("[[sim:empty x1]]")))
    assert response.status_code == 200
    assert response.content == b""


def test_redirect_is_a_301_without_a_body(sim: Simulator) -> None:
    response = requests.post(
        f"{sim.url}/v1/messages",
        json=request_body(unique("[[sim:redirect]]")),
        headers=KEY,
        allow_redirects=False,
        timeout=5,
    )
    assert response.status_code == 301
    assert response.headers["location"] == "/v2/messages"
    assert response.content == b""


def test_drop_closes_the_connection_without_an_answer(sim: Simulator) -> None:
    body = request_body(unique("[[sim:drop x1]]"))
    with pytest.raises(requests.ConnectionError):
        post(sim, body)
    assert post(sim, body).status_code == 200


def test_without_a_count_a_fault_lasts_forever(sim: Simulator) -> None:
    body = request_body(unique("[[sim:529]]"))
    assert [post(sim, body).status_code for _ in range(3)] == [529, 529, 529]


def test_fault_directives_apply_in_turn(sim: Simulator) -> None:
    body = request_body(unique("[[sim:429 x1]] then [[sim:500 x2]]"))
    assert [post(sim, body).status_code for _ in range(4)] == [429, 500, 500, 200]


def test_directive_counters_are_per_body(sim: Simulator) -> None:
    prompt = unique("[[sim:500 x1]]")
    assert post(sim, request_body(prompt)).status_code == 500
    assert post(sim, request_body(prompt, max_tokens=100)).status_code == 500
    assert post(sim, request_body(prompt)).status_code == 200


def test_a_latency_directive_slows_that_call_only(sim: Simulator) -> None:
    started = time.monotonic()
    assert post(sim, request_body(unique("[[sim:latency=0.4]]"))).status_code == 200
    slow = time.monotonic() - started
    started = time.monotonic()
    assert post(sim, request_body(unique("fast"))).status_code == 200
    assert slow >= 0.4
    assert time.monotonic() - started < 0.3


def test_an_unknown_directive_is_a_400_that_names_it(sim: Simulator) -> None:
    response = post(sim, request_body("[[sim:explode]]"))
    assert response.status_code == 400
    assert "[[sim:explode]]" in error_of(response)[1]


def test_parse_directives() -> None:
    directives = parse_directives("a [[sim:429 x2]] b [[sim:latency=1.5]] [[sim:drop]]")
    assert directives.faults == (("429", 2), ("drop", None))
    assert directives.latency == 1.5
    assert [directives.fault_for_call(i) for i in (0, 1, 2, 99)] == ["429", "429", "drop", "drop"]
    assert parse_directives("no directives").fault_for_call(0) is None


# --- rate limits ------------------------------------------------------------------------------


def _rfc3339(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_the_request_bucket_answers_429_with_retry_after_then_recovers() -> None:
    with Simulator(SimulatorConfig(rpm=120, burst_seconds=1)) as sim:
        first, second, third = (post(sim, request_body(f"call {i}")) for i in range(3))

        assert (first.status_code, second.status_code) == (200, 200)
        assert first.headers["anthropic-ratelimit-requests-limit"] == "120"
        assert first.headers["anthropic-ratelimit-requests-remaining"] == "1"
        assert third.status_code == 429
        assert error_of(third)[0] == "rate_limit_error"
        assert third.headers["retry-after"] == "1"
        assert third.headers["anthropic-ratelimit-requests-remaining"] == "0"
        assert _rfc3339(third.headers["anthropic-ratelimit-requests-reset"]).tzinfo is not None

        time.sleep(0.6)  # 2 requests a second: one is back after 0.5 s
        assert post(sim, request_body("after the wait")).status_code == 200


def test_output_tokens_are_reserved_from_max_tokens() -> None:
    # 10 tokens a second, a bucket of one second.
    with Simulator(SimulatorConfig(output_tpm=600, token_burst_seconds=1)) as sim:
        body = request_body("a reply longer than ten tokens", max_tokens=10)
        assert post(sim, body).status_code == 200
        limited = post(sim, body)
        assert limited.status_code == 429
        assert limited.headers["anthropic-ratelimit-output-tokens-limit"] == "600"


def test_unused_output_tokens_are_refunded() -> None:
    with Simulator(SimulatorConfig(output_tpm=60_000)) as sim:  # 1000 a second
        response = post(sim, request_body("hi", max_tokens=1000))
        used = response.json()["usage"]["output_tokens"]
        remaining = int(response.headers["anthropic-ratelimit-output-tokens-remaining"])
        assert remaining >= 1000 - used - 1


def test_a_request_bigger_than_the_bucket_passes_once_and_leaves_a_debt() -> None:
    # 1 token a second, capacity 1.
    with Simulator(SimulatorConfig(input_tpm=60, token_burst_seconds=1)) as sim:
        assert post(sim, request_body("x" * 100)).status_code == 200  # 25 tokens
        limited = post(sim, request_body("y"))
        assert limited.status_code == 429
        assert 20 <= int(limited.headers["retry-after"]) <= 26
        assert "anthropic-ratelimit-input-tokens-reset" in limited.headers


def test_token_buckets_are_a_minute_deep_and_give_back_the_unwritten() -> None:
    # 600 output tokens a minute: three calls of max_tokens 200 fit at once, as at Anthropic,
    # and a fourth while they run does not.
    with Simulator(SimulatorConfig(output_tpm=600, latency=0.5)) as sim:
        bodies = [
            request_body(unique(f"deep {i} [[sim:output=20]]"), max_tokens=200) for i in range(3)
        ]
        with ThreadPoolExecutor(3) as pool:
            running = [pool.submit(post, sim, body) for body in bodies]
            time.sleep(0.25)
            assert post(sim, request_body(unique("fourth"), max_tokens=200)).status_code == 429
            assert [call.result().status_code for call in running] == [200, 200, 200]
        # Each wrote 20 of its 200: 540 came back, so the next one fits at once.
        assert post(sim, request_body(unique("after"), max_tokens=200)).status_code == 200


def test_cache_reads_do_not_count_against_the_input_limit() -> None:
    document = "The handbook. " * 143  # about 500 tokens, cached
    system = [{"type": "text", "text": document, "cache_control": {"type": "ephemeral"}}]
    with Simulator(SimulatorConfig(input_tpm=600)) as sim:  # a bucket of 600 tokens
        assert post(sim, request_body(unique("first"), system=system)).status_code == 200
        # About 100 tokens left: the whole prompt would not fit, its uncached part does.
        for i in range(3):
            response = post(sim, request_body(unique(f"read {i}"), system=system))
            assert response.status_code == 200
            assert response.json()["usage"]["cache_read_input_tokens"] > 400
        uncached = request_body(unique("not cached"), system=document)
        assert post(sim, uncached).status_code == 429


def test_an_output_directive_sets_the_length_of_the_answer(sim: Simulator) -> None:
    answer = post(sim, request_body(unique("[[sim:output=100]]"), max_tokens=200)).json()
    assert (answer["usage"]["output_tokens"], answer["stop_reason"]) == (100, "end_turn")
    capped = post(sim, request_body(unique("[[sim:output=100]]"), max_tokens=40)).json()
    assert (capped["usage"]["output_tokens"], capped["stop_reason"]) == (40, "max_tokens")


def test_no_ratelimit_headers_without_limits(sim: Simulator) -> None:
    response = post(sim, GOOD)
    assert not [h for h in response.headers if h.lower().startswith("anthropic-ratelimit")]


# --- random faults ----------------------------------------------------------------------------


def test_random_faults_follow_their_probabilities() -> None:
    with Simulator(SimulatorConfig(p_500=1.0)) as sim:
        assert post(sim, GOOD).status_code == 500
        sim.configure(p_500=0.0, p_drop=1.0)
        with pytest.raises(requests.ConnectionError):
            post(sim, GOOD)
        sim.configure(p_drop=0.0, p_malformed=1.0)
        assert post(sim, GOOD).headers["content-type"].startswith("text/html")
        sim.configure(p_malformed=0.0, p_openai_error=1.0)
        assert post(sim, GOOD).json()["error"]["type"] == "comet_api_error"
        sim.configure(p_openai_error=0.0, p_429=1.0)
        assert post(sim, GOOD).headers["retry-after"] == "1"


def test_a_seed_makes_random_faults_reproducible() -> None:
    def statuses() -> list[int]:
        with Simulator(SimulatorConfig(p_529=0.5, seed=7)) as sim:
            return [post(sim, GOOD).status_code for _ in range(16)]

    first = statuses()
    assert first == statuses()
    assert {200, 529} == set(first)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        SimulatorConfig(p_500=0.7, p_529=0.7)
    with pytest.raises(ValueError):
        SimulatorConfig(rpm=0)
    with pytest.raises(ValueError):
        SimulatorConfig().patched({"no_such_setting": 1})


# --- control endpoints and concurrency --------------------------------------------------------


def test_stats_reset_and_config_endpoints() -> None:
    with Simulator() as sim:
        post(sim, request_body("counted prompt"))
        post(sim, request_body("counted prompt [[sim:529 x1]]"))
        post(sim, {**GOOD, "model": "gpt-4o"})

        stats = requests.get(f"{sim.url}/_sim/stats", timeout=5).json()
        assert stats["calls"] == 3
        assert stats["succeeded"] == 1
        assert stats["by_status"] == {"200": 1, "529": 1, "404": 1}
        assert stats["calls_by_prompt"]["counted prompt"] == 1
        assert stats["in_flight"] == 0
        assert stats["max_in_flight"] == 1

        assert requests.post(f"{sim.url}/_sim/reset", timeout=5).status_code == 200
        assert sim.stats()["calls"] == 0
        # the directive counter was cleared too: the 529 comes again
        assert post(sim, request_body("counted prompt [[sim:529 x1]]")).status_code == 529

        patched = requests.post(f"{sim.url}/_sim/config", json={"latency": 0.3}, timeout=5)
        assert patched.status_code == 200
        assert patched.json()["latency"] == 0.3
        started = time.monotonic()
        post(sim, GOOD)
        assert time.monotonic() - started >= 0.3

        requests.post(f"{sim.url}/_sim/config", json={"latency": 0, "rpm": 60}, timeout=5)
        assert post(sim, GOOD).status_code == 200
        assert post(sim, GOOD).status_code == 429

        refused = requests.post(f"{sim.url}/_sim/config", json={"rpn": 5}, timeout=5)
        assert refused.status_code == 400
        assert "rpn" in refused.json()["error"]["message"]
        refused = requests.post(f"{sim.url}/_sim/config", json={"p_500": 2}, timeout=5)
        assert refused.status_code == 400


def test_many_slow_calls_are_served_at_once() -> None:
    calls = 100
    with Simulator(SimulatorConfig(latency=0.5)) as sim:
        statuses: list[int] = []

        def call(i: int) -> None:
            statuses.append(post(sim, request_body(f"parallel {i}")).status_code)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(calls)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started

        assert statuses == [200] * calls
        assert elapsed < 3.0
        assert sim.stats()["max_in_flight"] >= calls // 2
        assert sim.stats()["in_flight"] == 0


def test_stop_frees_the_port() -> None:
    sim = Simulator().start()
    url = sim.url
    assert post(sim, GOOD).status_code == 200
    sim.stop()
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{url}/v1/messages", json=GOOD, headers=KEY, timeout=2)
