"""Answers: what one call sends back, and the error bodies of Anthropic and of proxies."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Answer:
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the socket without a word
    succeeded: bool = False  # a message was delivered


def _json_answer(status: int, payload: Any, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, json.dumps(payload).encode(), headers=dict(headers or {}))


class ApiError(Exception):
    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def anthropic_error(
    status: int,
    error_type: str,
    message: str,
    request_id: str,
    headers: dict[str, str] | None = None,
) -> Answer:
    payload = {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": request_id,
    }
    return _json_answer(status, payload, headers)


def openai_error(status: int, message: str, code: str) -> Answer:
    error = {"message": message, "type": "comet_api_error", "param": None, "code": code}
    return _json_answer(status, {"error": error})


def _html(status: int, title: str, text: str) -> Answer:
    page = (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<p>{text}</p>\r\n"
        "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )
    return Answer(status, page.encode(), "text/html; charset=utf-8")
