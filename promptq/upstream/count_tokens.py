"""POST /v1/messages/count_tokens, passed to the upstream: counting a prompt is free at
Anthropic and is not a job, so it is neither queued, rate limited nor charged. The answer
is the upstream's; its errors come back in Anthropic's shape with the upstream's status."""

from __future__ import annotations

from typing import Any

from promptq.upstream.anthropic_errors import anthropic_error
from promptq.upstream.client import UpstreamClient
from promptq.upstream.errors import read_error

PATH = "/v1/messages/count_tokens"
# promptq's own status when the upstream gave no usable answer: a bad gateway, as a proxy
# says it, with Anthropic's type for a fault that is not the caller's.
NO_ANSWER_STATUS = 502


def count_tokens(
    upstream: UpstreamClient, body: bytes, beta: str | None
) -> tuple[int, dict[str, Any]]:
    """The status and JSON body to answer with."""
    reply = upstream.exchange("POST", PATH, body=body, beta=beta)
    status = reply.status_code
    payload = reply.payload
    if status is not None and 200 <= status < 300 and isinstance(payload, dict):
        return status, payload
    error = read_error(payload)
    if status is not None and status >= 400 and error is not None:
        return anthropic_error(error.type, error.describe(), status)
    problem = reply.problem or f"answered {status} without a token count"
    return NO_ANSWER_STATUS, anthropic_error(
        "api_error",
        f"promptq could not count tokens: the upstream at {upstream.base_url}{PATH} {problem}; "
        "retry later, or check PROMPTQ_UPSTREAM_URL (an upstream without this endpoint "
        "cannot count tokens)",
        NO_ANSWER_STATUS,
    )[1]
