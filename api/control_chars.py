"""Control characters in a request's path or query are refused before any route runs (a
422, or a 400 on the Anthropic-compatible paths: the refusal rule of api.errors).

Ids, names, cursors and statuses never hold one, and PostgreSQL refuses a NUL in text
outright: `GET /v1/jobs/job_%00` would otherwise reach the database and come back a 500.
"""

from __future__ import annotations

import json
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_body, refusal_status
from promptq.validation import CONTROL_CHARACTER


class RefuseControlCharacters:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            where = _where(scope)
            if where is not None:
                await _refuse(send, scope["path"], where)
                return
        await self.app(scope, receive, send)


def _where(scope: Scope) -> str | None:
    if CONTROL_CHARACTER.search(scope["path"]):
        return "the path"
    query = unquote_to_bytes(scope.get("query_string", b"").replace(b"+", b" "))
    if CONTROL_CHARACTER.search(query.decode("latin-1")):
        return "the query string"
    return None


async def _refuse(send: Send, path: str, where: str) -> None:
    message = f"{where} holds a control character (such as %00); ids, names and parameters never do"
    status = refusal_status(path)
    body = json.dumps(error_body(status, message, None, path)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
