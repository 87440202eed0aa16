"""Receive promptq webhooks and verify their Standard Webhooks signature.

    pip install standardwebhooks
    PROMPTQ_WEBHOOK_SECRET=whsec_... python verify_webhook.py   # listens on 127.0.0.1:8787

Use `verify()` on its own in any web framework: hand it the raw body bytes, exactly as
received (parsing and re-serialising the JSON changes the bytes and breaks the signature).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections import OrderedDict
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class InvalidWebhook(Exception):
    """The request did not come from promptq, was altered, or is too old or too new."""


def verify(secret: str, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The event (`{"type": ..., "timestamp": ..., "data": {the job}}`) if the request is
    genuine; raises InvalidWebhook otherwise.

    The library checks the `v1,` HMAC-SHA256 signatures in `webhook-signature` (any one of
    several, space-separated) in constant time, and refuses a `webhook-timestamp` more than
    5 minutes from now, so a captured request cannot be replayed later.
    """
    webhook = Webhook(secret)  # a malformed secret raises here: that is a setup error
    try:
        event = webhook.verify(body, dict(headers))
    except WebhookVerificationError as exc:
        raise InvalidWebhook(str(exc)) from None
    except ValueError:  # the library's own parsing: bad base64, no "v1,", a non-UTF-8 body
        raise InvalidWebhook("malformed webhook-signature header or body") from None
    if not isinstance(event, dict):
        raise InvalidWebhook("the body is not a JSON object")
    return event


class _SeenIds:
    """The last webhook-ids handled. A retried delivery keeps its webhook-id, so a receiver
    that answered too slowly the first time sees the same event again; keep this in your
    database in production, where it survives restarts and is shared between processes."""

    def __init__(self, size: int = 10_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def __contains__(self, webhook_id: str) -> bool:
        return webhook_id in self._ids

    def add(self, webhook_id: str) -> None:
        self._ids[webhook_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)


def make_handler(secret: str) -> type[BaseHTTPRequestHandler]:
    seen = _SeenIds()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            try:
                event = verify(secret, dict(self.headers.items()), body)
            except InvalidWebhook as exc:
                # Any non-2xx makes promptq retry; a forged request deserves no other answer.
                self._answer(401, f"invalid webhook: {exc}")
                return
            webhook_id = self.headers["webhook-id"]
            if webhook_id in seen:
                print(f"{webhook_id}: already handled, skipped", flush=True)
            else:
                try:
                    handle(webhook_id, event)
                except Exception:
                    # Not marked as seen: promptq gets no 2xx and sends the event again later.
                    traceback.print_exc()
                    self._answer(500, "handler failed")
                    return
                seen.add(webhook_id)
            # Answer quickly: promptq counts only a 2xx within 15 s as delivered. Slow work
            # belongs in a queue of your own, after this answer.
            self._answer(200, "ok")

        def _answer(self, status: int, text: str) -> None:
            payload = text.encode()
            self.send_response(status)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_: Any) -> None:
            pass  # one line per event from handle() is enough

    return Handler


def handle(webhook_id: str, event: dict[str, Any]) -> None:
    """Your code goes here."""
    data = event["data"]  # the job; for `batch.ended` (subscriptions only), the batch
    if event["type"] == "job.succeeded":
        detail = json.dumps(data["output_text"])
    elif event["type"] == "job.failed":
        detail = (data.get("error") or {}).get("message")
    else:
        detail = data.get("processing_status")
    print(f"{webhook_id}: {event['type']} {data['id']}: {detail}", flush=True)


def main() -> None:
    secret = os.environ.get("PROMPTQ_WEBHOOK_SECRET")
    if not secret:
        sys.exit("set PROMPTQ_WEBHOOK_SECRET to the key's whsec_... secret")
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8787"))
    server = ThreadingHTTPServer((host, port), make_handler(secret))
    print(f"listening on http://{host}:{port}/", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends it quietly
        server.serve_forever()


if __name__ == "__main__":
    main()
