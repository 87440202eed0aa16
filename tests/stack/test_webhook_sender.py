"""The webhook sender against real HTTP(S) servers on 127.0.0.1: what each answer becomes, the
deadline over a whole delivery, redirects not followed, and private addresses refused on the
connection itself, before a single byte reaches the server."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from promptq.testing import self_signed_certificate
from promptq.webhooks import DeliveryResult, WebhookSender, sign

SECRET = "whsec_" + base64.b64encode(b"promptq-webhook-sender-test-key").decode()
BODY = json.dumps({"type": "job.succeeded", "data": {"id": "job_1"}}).encode()
TIMEOUT = 1.0  # the tests' delivery deadline; promptq's is 15 s
SLACK = 0.75  # how far past the deadline a test lets a delivery end


@dataclass(frozen=True)
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


class Handler(BaseHTTPRequestHandler):
    server: RecordingServer.Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        seen = Seen(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        self.server.recorder.requests.append(seen)
        route = self.path.split("?")[0].strip("/").replace("-", "_") or "ok"
        getattr(self, f"route_{route}")()

    def answer(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_ok(self) -> None:
        self.answer(200, b"thanks")

    def route_slow_ok(self) -> None:
        time.sleep(0.2)
        self.answer(204)

    def route_fail(self) -> None:
        self.answer(500, b"boom " * 1000)

    def route_fail_retry_after(self) -> None:
        self.answer(500, b"", retry_after="5")

    def route_busy(self) -> None:
        self.answer(429, b'{"error": "slow down"}', retry_after="7")

    def route_unavailable(self) -> None:
        when = datetime.now(UTC) + timedelta(seconds=30)
        self.answer(503, b"", retry_after=format_datetime(when, usegmt=True))

    def route_redirect(self) -> None:
        self.answer(301, b"moved", location=self.server.recorder.redirect_to)

    def route_sleep(self) -> None:
        self.server.recorder.stopped.wait(5)
        self.answer(200, b"too late")

    def route_drip_headers(self) -> None:
        # A status line, then one header a byte at a time: every read finds a byte, so only
        # a deadline over the whole delivery stops it.
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for byte in b"x-slow: " + b"a" * 1000:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            if self.server.recorder.stopped.wait(0.02):
                return

    def route_drip_body(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "1000")
        self.end_headers()
        for _ in range(1000):
            self.wfile.write(b"x")
            self.wfile.flush()
            if self.server.recorder.stopped.wait(0.02):
                return


class RecordingServer:
    """A real HTTP server on 127.0.0.1 that records every connection and request."""

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        # socketserver's backlog of 5 drops the rest of a burst of connects, which the
        # client only retries after a second: longer than the tests' deadline.
        request_queue_size = 64
        recorder: RecordingServer

        def verify_request(self, request: Any, client_address: Any) -> bool:
            self.recorder.connections += 1
            return True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # clients hanging up mid-answer is what the deadline tests do on purpose

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[Seen] = []
        self.connections = 0
        self.redirect_to = ""
        self.stopped = threading.Event()
        self.server = self.Server(("127.0.0.1", 0), Handler)
        self.server.recorder = self
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def url(self, path: str = "/ok", host: str = "127.0.0.1") -> str:
        scheme = "http" if not isinstance(self.server.socket, ssl.SSLSocket) else "https"
        return f"{scheme}://{host}:{self.port}{path}"

    def stop(self) -> None:
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    recorder = RecordingServer()
    yield recorder
    recorder.stop()


@pytest.fixture
def other_server() -> Iterator[RecordingServer]:
    recorder = RecordingServer()
    yield recorder
    recorder.stop()


def headers() -> dict[str, str]:
    return sign(SECRET, "msg_test", datetime.now(UTC), BODY)


def timed(post: Callable[[], DeliveryResult]) -> tuple[DeliveryResult, float]:
    started = time.monotonic()
    result = post()
    return result, time.monotonic() - started


PRIVATE_OK = WebhookSender(allow_private=True, timeout=TIMEOUT)


def test_a_2xx_is_a_success_and_the_receiver_can_verify_it(server: RecordingServer) -> None:
    result = PRIVATE_OK.post(server.url("/ok?token=abc"), BODY, headers())
    assert result == DeliveryResult(
        status_code=200,
        latency_ms=result.latency_ms,
        response_excerpt="thanks",
        error=None,
        retry_after=None,
    )
    assert result.succeeded
    assert 0 <= result.latency_ms < TIMEOUT * 1000
    [seen] = server.requests
    assert seen.path == "/ok?token=abc"
    assert seen.body == BODY
    assert seen.headers["host"] == f"127.0.0.1:{server.port}"
    assert seen.headers["content-type"] == "application/json"
    assert Webhook(SECRET).verify(seen.body, seen.headers) == json.loads(BODY)


def test_latency_is_measured(server: RecordingServer) -> None:
    result = PRIVATE_OK.post(server.url("/slow-ok"), BODY, headers())
    assert result.succeeded
    assert result.status_code == 204
    assert result.response_excerpt == ""
    assert 200 <= result.latency_ms < TIMEOUT * 1000


def test_a_500_fails_with_an_excerpt_of_the_body(server: RecordingServer) -> None:
    result = PRIVATE_OK.post(server.url("/fail"), BODY, headers())
    assert not result.succeeded
    assert result.status_code == 500
    assert result.error == "the endpoint answered 500 Internal Server Error"
    assert result.response_excerpt == ("boom " * 1000)[:1024]
    assert result.retry_after is None


def test_retry_after_is_read_on_429_and_503_only(server: RecordingServer) -> None:
    busy = PRIVATE_OK.post(server.url("/busy"), BODY, headers())
    assert (busy.status_code, busy.retry_after, busy.succeeded) == (429, 7.0, False)
    assert busy.error is not None and "429" in busy.error
    assert busy.response_excerpt == '{"error": "slow down"}'
    unavailable = PRIVATE_OK.post(server.url("/unavailable"), BODY, headers())
    assert unavailable.status_code == 503
    assert unavailable.retry_after is not None and 25 < unavailable.retry_after <= 30
    failed = PRIVATE_OK.post(server.url("/fail-retry-after"), BODY, headers())
    assert failed.status_code == 500
    assert failed.retry_after is None


def test_a_redirect_is_a_failure_and_is_not_followed(
    server: RecordingServer, other_server: RecordingServer
) -> None:
    server.redirect_to = other_server.url("/landed?token=secret").replace(
        "http://", "http://alice:pw@"
    )
    result = PRIVATE_OK.post(server.url("/redirect"), BODY, headers())
    assert not result.succeeded
    assert result.status_code == 301
    assert result.error is not None
    assert "redirect" in result.error
    assert "does not follow redirects" in result.error
    assert f"127.0.0.1:{other_server.port}/landed" in result.error
    assert "pw" not in result.error and "secret" not in result.error
    assert other_server.connections == 0
    assert other_server.requests == []


def test_a_server_that_answers_too_late_times_out(server: RecordingServer) -> None:
    result, elapsed = timed(lambda: PRIVATE_OK.post(server.url("/sleep"), BODY, headers()))
    assert not result.succeeded
    assert result.status_code is None
    assert result.error == f"127.0.0.1:{server.port} did not answer within 1s"
    assert TIMEOUT <= elapsed < TIMEOUT + SLACK
    assert TIMEOUT * 1000 <= result.latency_ms < (TIMEOUT + SLACK) * 1000


def test_the_deadline_holds_against_headers_sent_a_byte_at_a_time(
    server: RecordingServer,
) -> None:
    result, elapsed = timed(lambda: PRIVATE_OK.post(server.url("/drip-headers"), BODY, headers()))
    assert result.status_code is None
    assert result.error == f"127.0.0.1:{server.port} did not answer within 1s"
    assert elapsed < TIMEOUT + SLACK


def test_the_deadline_holds_against_a_body_sent_a_byte_at_a_time(
    server: RecordingServer,
) -> None:
    # The 2xx came in time, so the delivery succeeded; the excerpt is what came with it.
    result, elapsed = timed(lambda: PRIVATE_OK.post(server.url("/drip-body"), BODY, headers()))
    assert elapsed < TIMEOUT + SLACK
    assert result.status_code == 200
    assert result.succeeded
    assert result.response_excerpt is not None
    assert 0 < len(result.response_excerpt) < 1000
    assert set(result.response_excerpt) == {"x"}


def test_the_deadline_holds_in_a_process_forked_after_a_delivery(
    server: RecordingServer,
) -> None:
    # The parent's deadline thread does not run in the child: the child needs its own.
    assert PRIVATE_OK.post(server.url("/ok"), BODY, headers()).status_code == 200
    child = os.fork()
    if child == 0:  # pragma: no cover (reported through the exit status)
        try:
            result, elapsed = timed(
                lambda: PRIVATE_OK.post(server.url("/drip-headers"), BODY, headers())
            )
            os._exit(0 if result.status_code is None and elapsed < TIMEOUT + SLACK else 1)
        finally:
            os._exit(2)
    # Waited for with a bound of its own: a child hung on its POST (a deadline that no
    # longer holds after a fork) fails here, and is killed, rather than left running.
    gives_up_at = time.monotonic() + TIMEOUT + SLACK + 10
    while (ended := os.waitpid(child, os.WNOHANG))[0] == 0:
        if time.monotonic() > gives_up_at:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            pytest.fail("the forked child's POST outlived its deadline: it hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(ended[1]) == 0


# Spellings of 127.0.0.1 the sender's connection must read the way a resolver does.
LOOPBACK_HOSTS = [
    "127.0.0.1",
    "localhost",  # a name: resolved, then refused for the address it resolves to
    "LocalHost",
    "2130706433",
    "0x7f000001",
    "0x7f.0.0.1",
    "0177.0.0.1",
    "127.1",
    "[::ffff:127.0.0.1]",
]


@pytest.mark.parametrize("host", LOOPBACK_HOSTS)
def test_private_targets_are_refused_before_any_connection(
    server: RecordingServer, host: str
) -> None:
    sender = WebhookSender(timeout=TIMEOUT)
    result = sender.post(server.url("/ok", host=host), BODY, headers())
    assert not result.succeeded
    assert result.status_code is None
    assert result.error is not None
    assert result.error.startswith("refused to connect to ")
    assert "loopback" in result.error
    assert "PROMPTQ_WEBHOOK_ALLOW_PRIVATE=true" in result.error
    assert server.connections == 0
    assert server.requests == []


def test_a_name_is_refused_for_the_address_it_resolves_to(server: RecordingServer) -> None:
    # Only the connection's own lookup can know that localhost is 127.0.0.1 here.
    result = WebhookSender(timeout=TIMEOUT).post(server.url(host="localhost"), BODY, headers())
    assert result.error is not None
    assert result.error.startswith("refused to connect to localhost: 127.0.0.1 is a loopback")
    assert server.connections == 0


@pytest.mark.parametrize("host", LOOPBACK_HOSTS)
def test_allow_private_reaches_every_spelling(server: RecordingServer, host: str) -> None:
    result = PRIVATE_OK.post(server.url("/ok", host=host), BODY, headers())
    assert result.succeeded, result.error
    assert server.connections == 1
    assert len(server.requests) == 1


def test_only_a_name_or_an_unusual_spelling_is_looked_up(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An address in its usual spelling needs no resolver (in a worker, a trip to a thread).
    looked_up: list[str] = []
    lookup = socket.getaddrinfo

    def recording(host: str, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    for host in ("127.0.0.1", "[::ffff:127.0.0.1]", "127.1", "localhost"):
        result = PRIVATE_OK.post(server.url("/ok", host=host), BODY, headers())
        assert result.succeeded, (host, result.error)
    assert looked_up == ["127.1", "localhost"]
    assert len(server.requests) == 4


def test_credentials_in_the_url_are_sent_but_never_reported(server: RecordingServer) -> None:
    url = server.url("/fail").replace("http://", "http://alice:s3cret@")
    result = PRIVATE_OK.post(url, BODY, headers())
    assert result.status_code == 500
    [seen] = server.requests
    assert seen.headers["authorization"] == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    refused = WebhookSender(timeout=TIMEOUT).post(url, BODY, headers())
    for outcome in (result, refused):
        assert "s3cret" not in repr(outcome)


def test_network_failures_are_results_not_exceptions(server: RecordingServer) -> None:
    port = server.port
    server.stop()  # nothing listens on the port any more
    result = PRIVATE_OK.post(f"http://127.0.0.1:{port}/ok", BODY, headers())
    assert result.status_code is None
    assert result.error is not None
    assert result.error.startswith(f"connecting to 127.0.0.1:{port} failed:")
    assert "refused" in result.error.lower()
    for url in ("not a url", "ftp://example.com/", "http:///nohost", "http://[::1/"):
        bad = PRIVATE_OK.post(url, BODY, headers())
        assert (
            bad.status_code is None
            and bad.error is not None
            and bad.error.startswith("webhook_url")
        )


def test_proxy_settings_in_the_environment_are_ignored(
    server: RecordingServer, other_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy would make the connection, and the address check, somebody else's.
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, other_server.url("/"))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert PRIVATE_OK.post(server.url(), BODY, headers()).succeeded
    assert len(server.requests) == 1
    assert other_server.connections == 0


def test_one_sender_serves_many_threads(server: RecordingServer) -> None:
    results: list[DeliveryResult] = []
    threads = [
        threading.Thread(target=lambda: results.append(PRIVATE_OK.post(server.url(), BODY, {})))
        for _ in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 16
    assert all(result.succeeded for result in results), [r.error for r in results]
    assert len(server.requests) == 16


# HTTPS: the connection goes to a checked address, while SNI and the certificate check
# still use the URL's name.


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for the name `localhost` only (no IP address in it)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[tuple[RecordingServer, list[str]]]:
    names: list[str] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)

    def remember(_socket: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        names.append(str(name))

    context.sni_callback = remember
    recorder = RecordingServer(tls=context)
    yield recorder, names
    recorder.stop()


@pytest.fixture
def trusting(certificate: tuple[Path, Path]) -> WebhookSender:
    """A sender whose CA bundle is the test certificate."""
    return WebhookSender(allow_private=True, timeout=TIMEOUT, ca_bundle=str(certificate[0]))


def test_https_verifies_the_certificate_for_the_name_not_the_address(
    tls_server: tuple[RecordingServer, list[str]], trusting: WebhookSender
) -> None:
    server, names = tls_server
    result = trusting.post(server.url(host="localhost"), BODY, headers())
    assert result.succeeded, result.error
    assert names == ["localhost"]
    [seen] = server.requests
    assert seen.headers["host"] == f"localhost:{server.port}"


def test_https_refuses_a_certificate_that_does_not_name_the_host(
    tls_server: tuple[RecordingServer, list[str]], trusting: WebhookSender
) -> None:
    server, _ = tls_server
    result = trusting.post(server.url(host="127.0.0.1"), BODY, headers())
    assert result.status_code is None
    assert result.error is not None
    assert result.error.startswith(f"TLS with 127.0.0.1:{server.port} failed:")
    assert server.requests == []


def test_one_sender_checks_every_posts_host_name_on_its_one_tls_context(
    tls_server: tuple[RecordingServer, list[str]], trusting: WebhookSender
) -> None:
    # The sender loads its CA bundle once, into a context all its POSTs share: a POST that
    # passed must leave nothing on it that lets the next one through unchecked.
    server, names = tls_server
    first = trusting.post(server.url(host="localhost"), BODY, headers())
    by_address = trusting.post(server.url(host="127.0.0.1"), BODY, headers())
    again = trusting.post(server.url(host="localhost"), BODY, headers())
    assert first.succeeded, first.error
    assert by_address.error is not None
    assert by_address.error.startswith(f"TLS with 127.0.0.1:{server.port} failed:")
    assert again.succeeded, again.error
    assert names == ["localhost", "None", "localhost"]  # no SNI name for an address
    assert len(server.requests) == 2


def test_https_with_the_default_trust_store_refuses_a_self_signed_certificate(
    tls_server: tuple[RecordingServer, list[str]],
) -> None:
    server, _ = tls_server
    result = PRIVATE_OK.post(server.url(host="localhost"), BODY, headers())
    assert result.error is not None and "certificate verify failed" in result.error
    assert server.requests == []


def test_https_to_a_private_address_is_refused_before_the_handshake(
    tls_server: tuple[RecordingServer, list[str]],
) -> None:
    server, names = tls_server
    result = WebhookSender(timeout=TIMEOUT).post(server.url(host="localhost"), BODY, headers())
    assert result.error is not None and "loopback" in result.error
    assert server.connections == 0
    assert names == []
