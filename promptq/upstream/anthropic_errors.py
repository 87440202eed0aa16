"""A failed job's error in Anthropic's shape, for the Anthropic-compatible endpoints:
`{"type": "error", "error": {"type": ..., "message": ...}}` and the status that goes with it.
"""

from __future__ import annotations

from typing import Any

# Anthropic's error types by status; a failure without an upstream status (the upstream
# never answered, a worker was lost) is an api_error, as Anthropic answers its own faults.
TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
ANTHROPIC_TYPES = frozenset(TYPE_BY_STATUS.values())
# Failures promptq decides itself, with no upstream answer: the status that says why.
STATUS_BY_LOCAL_ERROR = {"budget_exceeded_error": 402}


def anthropic_error(
    error_type: str | None, message: str | None, upstream_status: int | None
) -> tuple[int, dict[str, Any]]:
    status = upstream_status if upstream_status and 400 <= upstream_status < 600 else 500
    if error_type in STATUS_BY_LOCAL_ERROR:
        return STATUS_BY_LOCAL_ERROR[error_type], {
            "type": "error",
            "error": {"type": error_type, "message": message or "the request was refused"},
        }
    if error_type not in ANTHROPIC_TYPES:
        error_type = TYPE_BY_STATUS.get(status, "api_error")
    body = {
        "type": "error",
        "error": {"type": error_type, "message": message or "the request failed"},
    }
    return status, body
