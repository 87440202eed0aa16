"""Request bodies the routes read themselves (JSON or a form, and the Anthropic routes)."""

from __future__ import annotations

import json
from typing import Any

from api.errors import ApiError
from promptq.jobspec.schemas import MAX_JSON_DEPTH, json_depth

TOO_DEEP = f"body nests deeper than {MAX_JSON_DEPTH} levels"


def parse_json_body(raw: bytes, check_depth: bool = True) -> Any:
    """The body as JSON, or a 400 that says why it is not. `check_depth=False` for batch
    bodies: walking 256 MB to count its levels would cost more than the check is worth,
    and the parser itself still refuses absurd nesting."""
    try:
        data = json.loads(raw)
    except RecursionError as exc:
        raise ApiError(400, TOO_DEEP) from exc
    except ValueError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from exc
    if check_depth and json_depth(data) > MAX_JSON_DEPTH:
        raise ApiError(400, TOO_DEEP)
    return data
