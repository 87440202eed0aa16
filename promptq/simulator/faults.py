"""Faults, by name, as directives and random faults produce them."""

from __future__ import annotations

from collections.abc import Callable

from promptq.simulator.answers import Answer, _html, anthropic_error, openai_error

_ANTHROPIC_FAULTS = {
    "400": (400, "invalid_request_error", "simulated invalid request"),
    "401": (401, "authentication_error", "invalid x-api-key"),
    "403": (
        403,
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    "404": (404, "not_found_error", "The requested resource could not be found."),
    "413": (413, "request_too_large", "Request exceeds the maximum allowed number of bytes."),
    "429": (429, "rate_limit_error", "Number of requests has exceeded your rate limit."),
    "500": (500, "api_error", "Internal server error"),
    "529": (529, "overloaded_error", "Overloaded"),
}
_PROXY_FAULTS: dict[str, Callable[[], Answer]] = {
    "502": lambda: _html(502, "502 Bad Gateway", "The upstream server did not answer."),
    "503": lambda: Answer(
        503,
        b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
        "text/plain",
    ),
    "504": lambda: _html(504, "504 Gateway Time-out", "The upstream server timed out."),
    "524": lambda: _html(524, "api.cometapi.com | 524: A timeout occurred", "Error code 524"),
    "html": lambda: _html(502, "Bad gateway", "Error code 502. Please try again in a few minutes."),
    "empty": lambda: Answer(200, b""),
    "drop": lambda: Answer(0, drop=True),
    "openai-500": lambda: openai_error(500, "internal error (simulated)", "internal_error"),
    "openai-invalid": lambda: openai_error(
        500, "invalid request: the upstream rejected the parameters (simulated)", "invalid_request"
    ),
    "redirect": lambda: Answer(301, b"", None, {"location": "/v2/messages"}),
}
FAULTS = frozenset(_ANTHROPIC_FAULTS) | frozenset(_PROXY_FAULTS)
# Faults that a client gets at once; the rest happen "while the model works", after latency.
_IMMEDIATE_FAULTS = frozenset({"400", "401", "403", "404", "413", "429", "redirect"})


def fault_answer(fault: str, request_id: str, ratelimit_headers: dict[str, str]) -> Answer:
    if fault in _ANTHROPIC_FAULTS:
        status, error_type, message = _ANTHROPIC_FAULTS[fault]
        headers = {"retry-after": "1", **ratelimit_headers} if status == 429 else {}
        return anthropic_error(status, error_type, message, request_id, headers)
    return _PROXY_FAULTS[fault]()
