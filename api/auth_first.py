"""Authenticate before reading a body: an unauthenticated request costs its headers only.

FastAPI reads and parses a route's body before it solves the route's dependencies (the
calling key among them), so without this a stranger's 8 MB of JSON would be read and
parsed before its 401. This pure ASGI middleware looks at the key in the headers first
(from the key cache, else one database read in the thread pool) and answers 401 without
ever calling `receive`. The route then finds the key in the cache.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.auth import request_caller
from api.errors import ApiError, error_body
from promptq.db import Database

# Every method that can carry a body on the client API; all of them need a key (the admin
# token's endpoints take no body).
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
CLIENT_API = "/v1/"


class AuthenticateFirst:
    def __init__(self, app: ASGIApp, database: Database) -> None:
        self.app = app
        self.database = database

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] in BODY_METHODS
            and scope["path"].startswith(CLIENT_API)
        ):
            try:
                # A Request over the scope alone: reads headers, never the body.
                await request_caller(Request(scope), self.database)
            except ApiError as exc:
                await _refuse(send, scope["path"], exc)
                return
            except Exception:
                # A database that does not answer is the route's to report (its 503).
                pass
        await self.app(scope, receive, send)


async def _refuse(send: Send, path: str, exc: ApiError) -> None:
    body = json.dumps(error_body(exc.status, exc.message, exc.error_type, path)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The body was never read, so the connection cannot carry another request.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
