"""Classification of an upstream answer: a pure function of its status, headers and body.

The contract: success is a 2xx whose JSON body is a message. Retry 429, 5xx (500, 502, 503,
504, 524, 529 and the rest), and a body that is neither a message nor an error of either shape.
Never retry a 3xx (the base URL is wrong) or a 4xx, nor a 500 whose OpenAI-shaped `code` is
`invalid_request`. For a 3xx or 4xx the status decides even when the body is an HTML page: a
wrong base URL answered by a web server's 404 page is not worth retrying.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from promptq.upstream.errors import UpstreamError, read_error
from promptq.upstream.result import Outcome, UpstreamResult

RATE_LIMIT_HEADER_PREFIX = "anthropic-ratelimit-"
_NOT_JSON = object()
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def parse_retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds to wait, from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    millis = _seconds(lowered.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    value = (lowered.get("retry-after") or "").strip()
    if not value:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _seconds(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _squash(raw: bytes, limit: int = 120) -> str:
    text = " ".join(raw[:4096].decode("utf-8", "replace").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_body(body: bytes, content_type: str) -> str:
    """What a body that is not the JSON we wanted looks like, for a person reading the error."""
    if not body.strip():
        return "an empty body"
    if "html" in content_type.lower() or body.lstrip()[:1] == b"<":
        title = _TITLE.search(body[:4096])
        return f'an HTML page ("{_squash(title.group(1))}")' if title else "an HTML page"
    return f'a body that is not JSON ("{_squash(body)}")'


def _load(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _NOT_JSON


def outcome_for(status_code: int, error: UpstreamError | None) -> Outcome:
    """Retry or not, for an answer that is not a success."""
    if 300 <= status_code < 500 and status_code != 429:
        return Outcome.PERMANENT
    if status_code == 500 and error and error.shape == "openai" and error.code == "invalid_request":
        return Outcome.PERMANENT
    return Outcome.TRANSIENT


def classify_response(
    status_code: int,
    headers: Mapping[str, str],
    body: bytes,
    latency_ms: int = 0,
    now: datetime | None = None,
) -> UpstreamResult:
    lowered = {k.lower(): v for k, v in headers.items()}

    def result(
        outcome: Outcome,
        error_type: str | None,
        error_message: str | None,
        message: dict[str, Any] | None = None,
    ) -> UpstreamResult:
        return UpstreamResult(
            outcome=outcome,
            status_code=status_code,
            latency_ms=latency_ms,
            request_id=lowered.get("request-id") or lowered.get("x-request-id"),
            message=message,
            error_type=error_type,
            error_message=error_message,
            retry_after=parse_retry_after(lowered, now),
            rate_limit_headers={
                k: v for k, v in lowered.items() if k.startswith(RATE_LIMIT_HEADER_PREFIX)
            },
        )

    payload = _load(body)
    answered = f"upstream answered {status_code}"
    if payload is _NOT_JSON:
        shown = describe_body(body, lowered.get("content-type", ""))
    else:
        shown = f"JSON that is neither a message nor an error ({_squash(body)})"

    if 200 <= status_code < 300:
        if isinstance(payload, dict) and payload.get("type") == "message":
            return result(Outcome.SUCCEEDED, None, None, message=payload)
        error = read_error(payload)
        if error is not None:
            text = f"{answered} with an error instead of a message: {error.describe()}"
            return result(Outcome.TRANSIENT, error.type, text)
        return result(Outcome.TRANSIENT, "malformed_response", f"{answered} with {shown}")

    if 300 <= status_code < 400:
        location = lowered.get("location")
        where = f"redirecting to {location}" if location else "(a redirect without a location)"
        text = (
            f"{answered} {where}: the upstream base URL looks wrong "
            "(give the base only; /v1/messages is appended to it)"
        )
        return result(Outcome.PERMANENT, "redirect", text)

    error = read_error(payload)
    outcome = outcome_for(status_code, error)
    if error is not None:
        return result(outcome, error.type, error.describe())
    return result(outcome, "malformed_response", f"{answered} with {shown}, not an error in JSON")
