"""The /v1/messages client: what each upstream answer is classified as, over real HTTP against the
simulator, and as a pure function of status, headers and body."""

from __future__ import annotations

import json
import shutil
import ssl
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from promptq.simulator import Simulator, SimulatorConfig
from promptq.supervisor import free_port
from promptq.testing import self_signed_certificate
from promptq.upstream import (
    Outcome,
    UpstreamClient,
    UpstreamResult,
    classify_response,
    parse_retry_after,
    read_error,
)

KEY = "sk-upstream-client-test-5f2b9c0e7a"
MODEL = "claude-haiku-4-5"


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(api_key=KEY)) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def client(sim: Simulator) -> UpstreamClient:
    return UpstreamClient(sim.url + "/", KEY, timeout=5, connect_timeout=2)


def params(prompt: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": f"{prompt} ({uuid.uuid4().hex[:8]})"}],
        **extra,
    }


def assert_no_key(result: UpstreamResult) -> None:
    assert KEY not in json.dumps(asdict(result), default=str)
    assert KEY not in repr(result)


# --- over HTTP --------------------------------------------------------------------------------


def test_a_good_call_succeeds_with_the_whole_message(client: UpstreamClient) -> None:
    result = client.create_message(params("Hello"))

    assert result.outcome is Outcome.SUCCEEDED
    assert result.succeeded
    assert result.status_code == 200
    assert result.request_id is not None and result.request_id.startswith("req_")
    assert result.message is not None
    assert result.message["type"] == "message"
    assert set(result.message["usage"]) >= {"input_tokens", "output_tokens"}
    assert result.error_type is None and result.error_message is None
    assert result.retry_after is None
    assert result.latency_ms >= 0
    assert_no_key(result)


def test_a_wrong_key_is_a_permanent_401(sim: Simulator) -> None:
    # The simulator accepts either header; a wrong key proves the client sends one at all.
    wrong = UpstreamClient(sim.url, "sk-wrong").create_message(params("x"))
    assert wrong.outcome is Outcome.PERMANENT
    assert wrong.status_code == 401
    assert wrong.error_type == "authentication_error"


DIRECTIVES = [
    # fault, outcome, status, error_type, words in the error message
    ("429", Outcome.TRANSIENT, 429, "rate_limit_error", ""),
    ("500", Outcome.TRANSIENT, 500, "api_error", "Internal server error"),
    ("502", Outcome.TRANSIENT, 502, "malformed_response", "502 with an HTML page"),
    ("503", Outcome.TRANSIENT, 503, "malformed_response", "not JSON"),
    ("504", Outcome.TRANSIENT, 504, "malformed_response", "HTML page"),
    ("524", Outcome.TRANSIENT, 524, "malformed_response", "HTML page"),
    ("529", Outcome.TRANSIENT, 529, "overloaded_error", "Overloaded"),
    ("html", Outcome.TRANSIENT, 502, "malformed_response", "HTML page"),
    ("empty", Outcome.TRANSIENT, 200, "malformed_response", "empty body"),
    ("openai-500", Outcome.TRANSIENT, 500, "comet_api_error", "internal_error"),
    ("400", Outcome.PERMANENT, 400, "invalid_request_error", ""),
    ("401", Outcome.PERMANENT, 401, "authentication_error", ""),
    ("403", Outcome.PERMANENT, 403, "permission_error", ""),
    ("404", Outcome.PERMANENT, 404, "not_found_error", ""),
    ("413", Outcome.PERMANENT, 413, "request_too_large", ""),
    ("openai-invalid", Outcome.PERMANENT, 500, "comet_api_error", "invalid_request"),
    ("redirect", Outcome.PERMANENT, 301, "redirect", "/v2/messages"),
]


@pytest.mark.parametrize(
    ("fault", "outcome", "status", "error_type", "words"),
    DIRECTIVES,
    ids=[d[0] for d in DIRECTIVES],
)
def test_each_fault_is_classified(
    client: UpstreamClient, fault: str, outcome: Outcome, status: int, error_type: str, words: str
) -> None:
    request = params(f"[[sim:{fault} x1]]")
    result = client.create_message(request)

    assert result.outcome is outcome
    assert result.status_code == status
    assert result.error_type == error_type
    assert result.error_message and words in result.error_message
    assert result.message is None
    assert_no_key(result)
    # the directive was for one call: the same request goes through now
    assert client.create_message(request).outcome is Outcome.SUCCEEDED


def test_a_429_carries_retry_after(client: UpstreamClient) -> None:
    result = client.create_message(params("[[sim:429 x1]]"))
    assert result.outcome is Outcome.TRANSIENT
    assert result.retry_after == 1.0


def test_a_dropped_connection_is_transient_without_a_status(client: UpstreamClient) -> None:
    result = client.create_message(params("[[sim:drop x1]]"))

    assert result.outcome is Outcome.TRANSIENT
    assert result.status_code is None
    assert result.error_type == "connection_error"
    assert result.request_id is None
    assert_no_key(result)


def test_a_validation_error_is_permanent_with_the_upstream_message(client: UpstreamClient) -> None:
    result = client.create_message(params("x", temperature=3))
    assert result.outcome is Outcome.PERMANENT
    assert result.status_code == 400
    assert result.error_message is not None and "temperature" in result.error_message


def test_a_timeout_is_transient(sim: Simulator) -> None:
    impatient = UpstreamClient(sim.url, KEY, timeout=0.3)
    result = impatient.create_message(params("[[sim:latency=1]]"))

    assert result.outcome is Outcome.TRANSIENT
    assert result.status_code is None
    assert result.error_type == "timeout"
    assert 250 <= result.latency_ms < 1000
    assert_no_key(result)


def test_a_refused_connection_is_transient() -> None:
    result = UpstreamClient(f"http://127.0.0.1:{free_port()}", KEY).create_message(params("x"))

    assert result.outcome is Outcome.TRANSIENT
    assert result.status_code is None
    assert result.error_type == "connection_error"
    assert result.error_message is not None and "refused" in result.error_message.lower()
    assert_no_key(result)


def test_a_bad_base_url_is_permanent() -> None:
    result = UpstreamClient("api.cometapi.com", KEY).create_message(params("x"))
    assert result.outcome is Outcome.PERMANENT
    assert result.error_type == "configuration_error"
    assert_no_key(result)


def test_params_that_are_not_json_are_permanent(client: UpstreamClient) -> None:
    result = client.create_message({**params("x"), "metadata": {"when": object()}})
    assert result.outcome is Outcome.PERMANENT
    assert result.status_code is None


def test_rate_limits_come_back_with_retry_after_and_headers() -> None:
    with Simulator(SimulatorConfig(rpm=120, burst_seconds=1)) as sim:
        client = UpstreamClient(sim.url, KEY)
        results = [client.create_message(params(f"call {i}")) for i in range(3)]

    assert [r.outcome for r in results] == [Outcome.SUCCEEDED] * 2 + [Outcome.TRANSIENT]
    assert results[0].rate_limit_headers["anthropic-ratelimit-requests-limit"] == "120"
    limited = results[2]
    assert limited.status_code == 429
    assert limited.error_type == "rate_limit_error"
    assert limited.retry_after == 1.0
    assert limited.rate_limit_headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert "anthropic-ratelimit-requests-reset" in limited.rate_limit_headers


def test_calls_at_once_share_the_clients_connections() -> None:
    # A worker's greenlets (or threads) share one client: each call at once gets a
    # connection of its own from its pool, kept open for the calls after it.
    with Simulator() as sim:
        client = UpstreamClient(sim.url, KEY, timeout=5, max_connections=8)
        results: list[UpstreamResult] = []

        def round_of_calls() -> None:
            threads = [
                threading.Thread(
                    target=lambda: results.append(
                        client.create_message(params("[[sim:latency=0.3]] together"))
                    )
                )
                for _ in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        round_of_calls()
        opened = len(sim._server._connections)
        round_of_calls()

        assert [r.outcome for r in results] == [Outcome.SUCCEEDED] * 16
        assert sim.stats()["max_in_flight"] == 8  # at once, not one after another
        assert opened == 8
        assert len(sim._server._connections) == 8  # the second round opened none
        client.close()


class _Recorder(BaseHTTPRequestHandler):
    """Answers 401 in the OpenAI shape, echoing the key as some gateways do."""

    seen: list[dict[str, str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        body = json.dumps(
            {"error": {"message": f"Invalid token: {self.headers['x-api-key']}", "code": 401}}
        ).encode()
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.send_header("x-request-id", f"rid-{self.headers['x-api-key']}")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_the_client_sends_all_three_headers_and_never_returns_the_key() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = UpstreamClient(url, KEY).create_message(params("x"))
    finally:
        server.shutdown()
        server.server_close()

    [headers] = _Recorder.seen
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["x-api-key"] == KEY
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["content-type"] == "application/json"
    assert "promptq" in headers["user-agent"]
    assert result.outcome is Outcome.PERMANENT
    assert result.error_message == "Invalid token: [redacted] (code: 401)"
    assert result.request_id == "rid-[redacted]"
    assert_no_key(result)
    assert KEY not in repr(UpstreamClient(url, KEY))


class _Proxy(BaseHTTPRequestHandler):
    """A forward proxy that answers every request itself, recording the target it was
    asked for (the absolute URL in the request line)."""

    targets: list[str] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        type(self).targets.append(self.path)
        self.send_response(503)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_the_environments_proxy_is_used_unless_no_proxy_names_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What requests read from the environment for every call the client reads once: a
    # deployment whose egress goes through HTTP_PROXY/HTTPS_PROXY keeps working.
    _Proxy.targets.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        proxied = UpstreamClient("http://upstream.invalid:81", KEY).create_message(params("x"))
        monkeypatch.setenv("NO_PROXY", "upstream.invalid")
        direct = UpstreamClient("http://upstream.invalid:81", KEY, connect_timeout=2)
        bypassed = direct.create_message(params("x"))
    finally:
        server.shutdown()
        server.server_close()

    assert _Proxy.targets == ["http://upstream.invalid:81/v1/messages"]
    assert proxied.status_code == 503 and proxied.outcome is Outcome.TRANSIENT
    # Not through the proxy: the name does not resolve.
    assert bypassed.status_code is None and bypassed.error_type == "connection_error"


@contextmanager
def serving_over_tls(
    handler: type[BaseHTTPRequestHandler], folder: Path
) -> Iterator[tuple[int, Path]]:
    """A server of `handler` on 127.0.0.1 speaking TLS with a certificate for `localhost`
    made for it: its port and the certificate, for a client to trust."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    certificate, key = self_signed_certificate(folder)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certificate, key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield server.server_address[1], certificate
    finally:
        server.shutdown()
        server.server_close()


class _RefusingTunnels(BaseHTTPRequestHandler):
    """A proxy that refuses every CONNECT (403), recording the target asked for: a client
    that got that far trusted the proxy's certificate."""

    targets: list[str] = []

    def do_CONNECT(self) -> None:
        type(self).targets.append(self.path)
        self.send_response(403)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_an_https_proxy_is_trusted_through_the_environments_ca_bundle(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # As requests does: REQUESTS_CA_BUNDLE is what the proxy's certificate is checked against
    # too, not only the upstream's (urllib3's proxy_ssl_context, apart from its ssl_context).
    _RefusingTunnels.targets.clear()
    for name in ("https_proxy", "no_proxy", "NO_PROXY", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    with serving_over_tls(_RefusingTunnels, tmp_path) as (port, certificate):
        monkeypatch.setenv("HTTPS_PROXY", f"https://localhost:{port}")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate))
        trusted = UpstreamClient("https://upstream.invalid", KEY).create_message(params("x"))
        monkeypatch.delenv("REQUESTS_CA_BUNDLE")
        untrusted = UpstreamClient("https://upstream.invalid", KEY).create_message(params("x"))

    assert _RefusingTunnels.targets == ["upstream.invalid:443"]  # the trusted client's only
    assert trusted.error_type == "connection_error"
    assert "403" in (trusted.error_message or "")
    assert untrusted.error_type == "connection_error"
    assert "certificate verify failed" in (untrusted.error_message or "")


class _AnsweringOverTLS(BaseHTTPRequestHandler):
    """An upstream that answers every call with a message and closes the connection, so that
    each call opens a connection of its own (HTTP/1.0)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        body = json.dumps(
            {
                **MESSAGE,
                "model": MODEL,
                "content": [{"type": "text", "text": "hi"}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 3, "output_tokens": 1},
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_https_trusts_the_environments_ca_bundle_on_every_new_connection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The bundle is loaded once into a context every connection shares (promptq.tls): each
    # new connection must still verify the certificate and the name against it.
    for name in ("https_proxy", "HTTPS_PROXY", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    with serving_over_tls(_AnsweringOverTLS, tmp_path) as (port, certificate):
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate))
        trusting = UpstreamClient(f"https://localhost:{port}", KEY, timeout=5)
        calls = [trusting.create_message(params("hi")) for _ in range(3)]
        by_address = UpstreamClient(f"https://127.0.0.1:{port}", KEY, timeout=5)
        wrong_name = by_address.create_message(params("hi"))
        monkeypatch.delenv("REQUESTS_CA_BUNDLE")
        untrusting = UpstreamClient(f"https://localhost:{port}", KEY, timeout=5)
        not_trusted = untrusting.create_message(params("hi"))

    assert [call.outcome for call in calls] == [Outcome.SUCCEEDED] * 3
    for refused in (wrong_name, not_trusted):
        assert refused.outcome is Outcome.TRANSIENT
        assert refused.error_type == "connection_error"
    assert "127.0.0.1" in (wrong_name.error_message or "")
    assert "certificate verify failed" in (not_trusted.error_message or "")


# --- pure classification ----------------------------------------------------------------------

MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "content": []}


def classify(status: int, body: Any, **headers: str) -> UpstreamResult:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return classify_response(status, headers, raw, latency_ms=12)


def anthropic(error_type: str, message: str = "m") -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def openai(code: Any, message: str = "m") -> dict[str, Any]:
    return {"error": {"message": message, "type": "comet_api_error", "param": None, "code": code}}


def test_a_message_is_a_success() -> None:
    result = classify(200, MESSAGE)
    assert result.outcome is Outcome.SUCCEEDED
    assert result.message == MESSAGE
    assert result.latency_ms == 12


@pytest.mark.parametrize(
    ("body", "error_type", "words"),
    [
        (b"", "malformed_response", "empty body"),
        (b"<html><title>Oops</title></html>", "malformed_response", 'HTML page ("Oops")'),
        (b"ok", "malformed_response", "not JSON"),
        ({"choices": []}, "malformed_response", "neither a message nor an error"),
        (anthropic("overloaded_error", "busy"), "overloaded_error", "instead of a message: busy"),
    ],
)
def test_a_2xx_that_is_not_a_message_is_transient(body: Any, error_type: str, words: str) -> None:
    result = classify(200, body)
    assert result.outcome is Outcome.TRANSIENT
    assert result.error_type == error_type
    assert result.error_message is not None and words in result.error_message


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 520, 524, 529])
def test_server_side_statuses_are_transient(status: int) -> None:
    assert classify(status, anthropic("api_error")).outcome is Outcome.TRANSIENT
    assert classify(status, b"<html>gateway</html>").outcome is Outcome.TRANSIENT


@pytest.mark.parametrize("status", [301, 302, 307, 400, 401, 403, 404, 408, 413, 418, 422])
def test_client_side_statuses_are_permanent_whatever_the_body(status: int) -> None:
    assert classify(status, anthropic("invalid_request_error")).outcome is Outcome.PERMANENT
    assert classify(status, b"<html>Not Found</html>").outcome is Outcome.PERMANENT
    assert classify(status, b"").outcome is Outcome.PERMANENT


def test_a_500_with_code_invalid_request_is_permanent_and_others_are_not() -> None:
    assert classify(500, openai("invalid_request")).outcome is Outcome.PERMANENT
    assert classify(500, openai("internal_error")).outcome is Outcome.TRANSIENT
    assert classify(500, openai(None)).outcome is Outcome.TRANSIENT
    assert classify(502, openai("invalid_request")).outcome is Outcome.TRANSIENT
    assert classify(500, anthropic("invalid_request")).outcome is Outcome.TRANSIENT


def test_both_error_shapes_are_read() -> None:
    a = classify(529, anthropic("overloaded_error", "Overloaded"))
    assert (a.error_type, a.error_message) == ("overloaded_error", "Overloaded")
    o = classify(503, openai("model_not_available", "no channel"))
    assert (o.error_type, o.error_message) == (
        "comet_api_error",
        "no channel (code: model_not_available)",
    )
    assert read_error({"error": "text only"}) is None
    assert read_error({"error": {}}) is None
    assert read_error([1]) is None


def test_json_of_neither_shape_on_a_5xx_says_so() -> None:
    result = classify(503, {"detail": "down"})
    assert result.outcome is Outcome.TRANSIENT
    assert result.error_type == "malformed_response"
    assert result.error_message is not None and '{"detail": "down"}' in result.error_message


def test_a_redirect_names_the_wrong_base_url() -> None:
    result = classify(301, b"", location="https://example.com/v1/messages")
    assert result.error_type == "redirect"
    assert result.error_message is not None
    assert "https://example.com/v1/messages" in result.error_message
    assert "base URL" in result.error_message


def test_headers_are_read_case_insensitively() -> None:
    result = classify(
        429,
        anthropic("rate_limit_error"),
        **{
            "X-Request-Id": "rid-7",
            "Retry-After": "7",
            "Anthropic-RateLimit-Requests-Remaining": "0",
            "X-RateLimit-Other": "ignored",
        },
    )
    assert result.request_id == "rid-7"
    assert result.retry_after == 7.0
    assert result.rate_limit_headers == {"anthropic-ratelimit-requests-remaining": "0"}


def test_request_id_prefers_anthropics_header() -> None:
    result = classify(200, MESSAGE, **{"request-id": "req_a", "x-request-id": "b"})
    assert result.request_id == "req_a"


def test_parse_retry_after() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    earlier = format_datetime(now - timedelta(seconds=30), usegmt=True)

    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"Retry-After": later}, now=now) == 30.0
    assert parse_retry_after({"retry-after": earlier}, now=now) == 0.0
    assert parse_retry_after({"retry-after": "3", "retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "-4"}) is None
    assert parse_retry_after({"retry-after": "nan"}) is None
    assert parse_retry_after({}) is None


def test_redaction_reaches_every_text_field() -> None:
    result = classify(
        401,
        openai("bad_key", f"key {KEY} is wrong"),
        **{"request-id": KEY, "anthropic-ratelimit-requests-limit": KEY},
    ).redacted(KEY)
    assert_no_key(result)
    assert result.error_message == "key [redacted] is wrong (code: bad_key)"
