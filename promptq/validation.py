"""Pydantic's validation errors in the words a client reads."""

from __future__ import annotations

from typing import Any


def describe_validation_errors(errors: list[Any], drop_prefix: tuple[str, ...] = ()) -> str:
    """Pydantic's errors as one sentence per field: `request.max_tokens: ...`."""
    parts = []
    for error in errors:
        location = [str(item) for item in error.get("loc", ()) if item not in drop_prefix]
        field = ".".join(location) or "body"
        message = str(error.get("msg", "is invalid"))
        message = message.removeprefix("Value error, ")
        parts.append(message if message.split(":")[0] in field else f"{field}: {message}")
    return "; ".join(parts)
