"""promptq webhooks: the CPU of one POST through the sender, against the least urllib3 needs.

    .venv/bin/python bench/webhook_post.py               # 2,000 POSTs each way
    .venv/bin/python bench/webhook_post.py --https       # to a receiver with a private CA

A receiver in a process of its own on 127.0.0.1 answers every POST at once. This process
posts a signed delivery's body through `WebhookSender.post` (the address check, the
deadline, the excerpt, the result), then the same request on a bare urllib3
`HTTPConnection` (the baseline: a connection, the request, the status and body read), in
alternating blocks, one thread, and measures this process's CPU time for each; both name the
receiver `localhost`, looked up for every POST. In a worker that CPU is taken from the core
the jobs share. With `--https` the receiver speaks TLS with a certificate made for the run
(the `openssl` command), the sender is given certifi's CA bundle with that certificate added
(the size of bundle it loads in production), and the baseline's connections share one TLS
context with that bundle loaded: the TLS handshake is in both. Stdout is Markdown.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import certifi
from _report import cpu_model, markdown_table, print_markdown
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util.ssl_ import create_urllib3_context

from promptq.testing import self_signed_certificate
from promptq.webhooks.sender import WebhookSender

BODY = b'{"type":"job.succeeded","timestamp":"2026-12-05T00:00:00Z","data":{"id":"job_1"}}'
HEADERS = {
    "content-type": "application/json",
    "webhook-id": "msg_01JEXAMPLE",
    "webhook-timestamp": "1764892800",
    "webhook-signature": "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=",
}
BLOCKS = 10  # each way, alternating, so that a drift through the run weighs on both


def serve_receiver(certificate: str | None) -> None:
    """The receiver's process: prints its port, then answers every POST 200 with a short
    body until its stdin closes (the bench gone); over TLS when given a certificate."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

    server = Server(("127.0.0.1", 0), Handler)
    if certificate is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, str(Path(certificate).with_name("key.pem")))
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()
    os._exit(0)


def bundle_with(certificate: str, folder: Path) -> str:
    """certifi's CA bundle with the run's certificate added: a bundle of the size the sender
    loads in production, that trusts the receiver."""
    bundle = folder / "bundle.pem"
    bundle.write_text(Path(certifi.where()).read_text() + Path(certificate).read_text())
    return str(bundle)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=2000, help="POSTs each way (2000)")
    parser.add_argument("--https", action="store_true", help="to a receiver speaking TLS")
    parser.add_argument("--serve-receiver", metavar="CERTIFICATE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_receiver is not None:
        serve_receiver(args.serve_receiver or None)
    with tempfile.TemporaryDirectory() as folder:
        certificate = str(self_signed_certificate(Path(folder))[0]) if args.https else None
        receiver = subprocess.Popen(
            [sys.executable, __file__, "--serve-receiver", certificate or ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert receiver.stdout is not None
            port = int(receiver.stdout.readline())
            bundle = None if certificate is None else bundle_with(certificate, Path(folder))
            return measure(port, max(BLOCKS, args.posts), bundle)
        finally:
            receiver.terminate()
            receiver.wait(10)


def measure(port: int, posts: int, bundle: str | None) -> int:
    sender = WebhookSender(allow_private=True, ca_bundle=bundle)
    scheme = "http" if bundle is None else "https"
    url = f"{scheme}://localhost:{port}/hook"
    tls: ssl.SSLContext | None = None
    if bundle is not None:
        # What promptq.tls.verifying_context builds, written out with urllib3 alone: the
        # baseline stays the same whichever commit's promptq runs the sender.
        tls = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
        tls.load_verify_locations(cafile=bundle)

    def through_the_sender() -> None:
        result = sender.post(url, BODY, HEADERS)
        if not result.succeeded:
            raise SystemExit(f"a POST through the sender failed: {result.error}")

    def bare() -> None:
        connection = (
            HTTPConnection("localhost", port, timeout=15)
            if tls is None
            else HTTPSConnection("localhost", port, timeout=15, ssl_context=tls)
        )
        try:
            connection.request("POST", "/hook", body=BODY, headers=HEADERS)
            response = connection.getresponse()
            response.read(1024)
            if response.status != 200:
                raise SystemExit(f"a bare POST was answered {response.status}")
        finally:
            connection.close()

    ways: dict[str, Callable[[], None]] = {"sender": through_the_sender, "bare": bare}
    cpu = dict.fromkeys(ways, 0.0)
    wall = dict.fromkeys(ways, 0.0)
    for way in ways.values():
        way()  # warm: imports, the first connection
    per_block = posts // BLOCKS
    for _ in range(BLOCKS):
        for name, way in ways.items():
            started_cpu, started = cpu_seconds(), time.perf_counter()
            for _ in range(per_block):
                way()
            cpu[name] += cpu_seconds() - started_cpu
            wall[name] += time.perf_counter() - started
    done = per_block * BLOCKS
    sender_ms = cpu["sender"] / done * 1000
    bare_ms = cpu["bare"] / done * 1000
    print_markdown(
        [
            f"## Webhook POST CPU ({scheme})",
            "",
            markdown_table(
                ["Machine", ""],
                [
                    ["CPU", cpu_model()],
                    ["Cores (logical)", str(os.cpu_count() or "?")],
                    ["Python", platform.python_version()],
                    ["Load average at start (1 min)", f"{os.getloadavg()[0]:.2f}"],
                ],
            ),
            "",
            f"{done:,} POSTs each way to a receiver on 127.0.0.1 ({scheme}), one thread, in "
            f"{BLOCKS} alternating blocks; CPU of this process only.",
            "",
            markdown_table(
                ["Measure", "Result"],
                [
                    ["Sender CPU per POST", f"{sender_ms:.3f} ms"],
                    ["Bare urllib3 CPU per POST (baseline)", f"{bare_ms:.3f} ms"],
                    ["Sender / baseline", f"{sender_ms / bare_ms:.2f}x"],
                    ["Sender wall per POST", f"{wall['sender'] / done * 1000:.3f} ms"],
                    ["Bare wall per POST", f"{wall['bare'] / done * 1000:.3f} ms"],
                ],
            ),
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
