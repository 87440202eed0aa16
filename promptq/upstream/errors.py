"""The two error shapes an Anthropic-compatible upstream answers in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class UpstreamError:
    shape: Literal["anthropic", "openai"]
    type: str
    message: str
    code: str | None = None  # the OpenAI shape's `code`, as a string

    def describe(self) -> str:
        return f"{self.message} (code: {self.code})" if self.code else self.message


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def read_error(payload: Any) -> UpstreamError | None:
    """Anthropic's `{"type": "error", "error": {"type", "message"}}` or CometAPI's OpenAI-style
    `{"error": {"message", "type", "param", "code"}}`; None for anything else."""
    if not isinstance(payload, dict) or not isinstance(payload.get("error"), dict):
        return None
    error = payload["error"]
    message = _text(error.get("message"))
    if payload.get("type") == "error":
        return UpstreamError(
            "anthropic", _text(error.get("type")) or "api_error", message or "no message given"
        )
    code = error.get("code")
    code_text = None if code is None or isinstance(code, dict | list) else str(code) or None
    if message is None and code_text is None and _text(error.get("type")) is None:
        return None
    return UpstreamError(
        "openai",
        _text(error.get("type")) or "api_error",
        message or "no message given",
        code_text,
    )
