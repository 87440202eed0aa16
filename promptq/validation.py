"""Pydantic's validation errors in the words a client reads."""

from __future__ import annotations

import re
from typing import Any

from pydantic import AfterValidator

# C0 controls and DEL. PostgreSQL refuses a NUL in text outright (an error at the database,
# so a 500, rather than a 422), and no id, name or model holds any of them.
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def control_character_problem(value: str) -> str | None:
    """What is wrong with `value` if it holds a control character, else None."""
    found = CONTROL_CHARACTER.search(value)
    if found is None:
        return None
    return f"holds a control character (U+{ord(found.group()):04X}); ids and names never do"


def _no_control_characters(value: str) -> str:
    problem = control_character_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


# For a pydantic field: `Annotated[str, NO_CONTROL_CHARACTERS]`.
NO_CONTROL_CHARACTERS = AfterValidator(_no_control_characters)


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
