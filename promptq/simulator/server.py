"""The HTTP server, and the Python API on top of it: `Simulator` and `serve`."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from promptq.simulator.answers import Answer, _json_answer, anthropic_error
from promptq.simulator.config import MAX_BODY_BYTES, SimulatorConfig
from promptq.simulator.upstream import Upstream

log = logging.getLogger(__package__)  # "promptq.simulator", as when it was one module

# ---------------------------------------------------------------------------------------------
# HTTP: the standard library's ThreadingHTTPServer, because we need socket-level control (drop
# a connection, send a malformed body) that frameworks hide, and one thread per request makes
# simulated latency free: a sleeping call holds its own thread, never the others.

MODELS_PREFIX = "/v1/models/"
_REASONS = {524: "A Timeout Occurred", 529: "Overloaded"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients' connection pools expect
    # Headers and body leave in two writes; with Nagle's algorithm on, the second waits for
    # the client's delayed ACK of the first (40 ms on Linux), which no real upstream adds.
    disable_nagle_algorithm = True
    server_version = "promptq-simulator"
    timeout = 300  # frees the thread of an idle keep-alive connection
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("simulator %s " + format, self.client_address[0], *args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path, upstream = url.path, self.server.upstream
        if path == "/_sim/stats":
            self._send(_json_answer(200, upstream.stats.snapshot()))
        elif path == "/v1/models":
            self._send(upstream.models(self._lowered_headers(), parse_qs(url.query)))
        elif path.startswith(MODELS_PREFIX) and len(path) > len(MODELS_PREFIX):
            model_id = unquote(path[len(MODELS_PREFIX) :])
            self._send(upstream.model(self._lowered_headers(), model_id))
        else:
            self._not_found()

    def _lowered_headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        raw = self._read_body()
        upstream = self.server.upstream
        if path == "/v1/messages":
            self._send(upstream.handle(self._lowered_headers(), raw))
        elif path == "/v1/messages/count_tokens":
            self._send(upstream.count_tokens(self._lowered_headers(), raw))
        elif path == "/_sim/reset":
            upstream.reset()
            self._send(_json_answer(200, {"reset": True}))
        elif path == "/_sim/config":
            self._send(self._configure(raw))
        else:
            self._not_found()

    def _configure(self, raw: bytes | None) -> Answer:
        upstream = self.server.upstream
        try:
            changes = json.loads(raw or b"")
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object of settings")
            upstream.configure(upstream.config.patched(changes))
        except (ValueError, TypeError) as error:
            return anthropic_error(400, "invalid_request_error", str(error), "req_sim")
        return _json_answer(200, upstream.config.public())

    def _not_found(self) -> None:
        message = "The requested resource could not be found."
        self._send(anthropic_error(404, "not_found_error", message, "req_" + secrets.token_hex(12)))

    def _read_body(self) -> bytes | None:
        """The body, or None when it is too large (then the connection is closed after)."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes | None:
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if chunk == 0:
                while self.rfile.readline().strip():  # trailers
                    pass
                return b"".join(parts)
            size += chunk
            if size > MAX_BODY_BYTES:
                self.close_connection = True
                return None
            parts.append(self.rfile.read(chunk))
            self.rfile.readline()

    def _send(self, answer: Answer) -> None:
        try:
            if answer.drop:
                log.debug("simulator %s dropped the connection", self.client_address[0])
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(answer.status, _REASONS.get(answer.status))
            if answer.content_type:
                self.send_header("content-type", answer.content_type)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
        except OSError:
            # The client went away (its timeout, most often): nothing left to tell it.
            self.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Benchmarks hold 100+ calls open at once; the default backlog of 5 would refuse some.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], upstream: Upstream) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.upstream = upstream
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can hang without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its client
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("simulator: error while serving %s", client_address, exc_info=True)


# ---------------------------------------------------------------------------------------------
# Python API


class Simulator:
    """The simulator on a port of its own; binds at once, so `url` is known before `start()`."""

    def __init__(
        self, config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.upstream = Upstream(config or SimulatorConfig())
        self._server = _HTTPServer((host, port), self.upstream)
        self._thread: threading.Thread | None = None

    @property
    def config(self) -> SimulatorConfig:
        return self.upstream.config

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"http://[{name}]:{port}" if ":" in name else f"http://{name}:{port}"

    def start(self) -> Simulator:
        if self._thread is None:
            # A short poll makes stop() quick, which tests that start many simulators feel.
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="promptq-simulator",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
        self._server.close_connections()

    def stats(self) -> dict[str, Any]:
        return self.upstream.stats.snapshot()

    def reset(self) -> None:
        self.upstream.reset()

    def configure(self, **changes: Any) -> SimulatorConfig:
        self.upstream.configure(self.upstream.config.patched(changes))
        return self.upstream.config

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(host: str, port: int, config: SimulatorConfig) -> None:
    """Serve in the foreground until KeyboardInterrupt."""
    simulator = Simulator(config, host, port)
    log.info("promptq upstream simulator listening on %s", simulator.url)
    try:
        simulator._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        simulator._server.server_close()
        simulator._server.close_connections()
