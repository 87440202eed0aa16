"""GET /v1/models and GET /v1/models/{id}, as Anthropic serves them: newest first, paged with
`limit` (1-1000, default 20), `after_id` and `before_id`."""

from __future__ import annotations

from typing import Any

from promptq.simulator.answers import ApiError

# The simulator's own list. The ids are ones promptq's built-in prices know, so jobs on them
# are priced; the dates are the simulator's, not release dates to rely on.
MODELS: tuple[dict[str, str], ...] = tuple(
    {"type": "model", "id": model_id, "display_name": name, "created_at": created}
    for model_id, name, created in (
        ("claude-opus-4-7", "Claude Opus 4.7", "2026-09-17T00:00:00Z"),
        ("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-06-02T00:00:00Z"),
        ("claude-opus-4-6", "Claude Opus 4.6", "2026-04-14T00:00:00Z"),
        ("claude-haiku-4-5", "Claude Haiku 4.5", "2025-10-15T00:00:00Z"),
        ("claude-sonnet-4-5", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
        ("claude-opus-4-1", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
        ("claude-3-5-haiku-20241022", "Claude Haiku 3.5", "2024-10-22T00:00:00Z"),
    )
)
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


def _position(model_id: str, field: str) -> int:
    for index, model in enumerate(MODELS):
        if model["id"] == model_id:
            return index
    raise _invalid(f"{field}: no model {model_id!r} in this list")


def list_page(query: dict[str, list[str]]) -> dict[str, Any]:
    """One page of the list; `query` as urllib.parse.parse_qs gives it."""
    raw_limit = query.get("limit", [str(DEFAULT_LIMIT)])[-1]
    try:
        limit = int(raw_limit)
    except ValueError:
        raise _invalid("limit: Input should be a valid integer") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise _invalid(f"limit: Input should be between 1 and {MAX_LIMIT}")
    after = query.get("after_id", [None])[-1]
    before = query.get("before_id", [None])[-1]
    if after and before:
        raise _invalid("give after_id or before_id, not both")
    if before:
        end = _position(before, "before_id")
        start = max(0, end - limit)
        has_more = start > 0
    else:
        start = _position(after, "after_id") + 1 if after else 0
        end = min(len(MODELS), start + limit)
        has_more = end < len(MODELS)
    data = list(MODELS[start:end])
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def get_model(model_id: str) -> dict[str, str]:
    for model in MODELS:
        if model["id"] == model_id:
            return model
    raise ApiError(404, "not_found_error", f"model: {model_id}")
