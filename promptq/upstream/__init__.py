"""The upstream: CometAPI's (or any) Anthropic-compatible `POST /v1/messages`."""

from promptq.upstream.classify import classify_response, outcome_for, parse_retry_after
from promptq.upstream.client import UpstreamClient
from promptq.upstream.errors import UpstreamError, read_error
from promptq.upstream.result import Outcome, UpstreamResult

__all__ = [
    "Outcome",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamResult",
    "classify_response",
    "outcome_for",
    "parse_retry_after",
    "read_error",
]
