"""Refuses request bodies over the configured size before they are read whole.

Starlette has no body size limit of its own, and uvicorn's is for headers only; a reverse
proxy may not be there, so this pure ASGI middleware counts bytes as they arrive.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    def __init__(
        self, app: ASGIApp, max_bytes: int, limits_by_path: dict[str, tuple[int, str]] | None = None
    ) -> None:
        """`limits_by_path`: a path's own limit and the setting that raises it."""
        self.app = app
        self.default = (max_bytes, "PROMPTQ_MAX_BODY_BYTES")
        self.limits_by_path = limits_by_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        max_bytes, setting = self.limits_by_path.get(path.rstrip("/"), self.default)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await self._refuse(send, path, max_bytes, setting)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, path, max_bytes, setting)

    async def _refuse(self, send: Send, path: str, max_bytes: int, setting: str) -> None:
        message = (
            f"request body is larger than the limit of {max_bytes} bytes ({setting}); "
            "send less, or raise the limit"
        )
        body = json.dumps(error_body(413, message, "request_too_large", path)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
