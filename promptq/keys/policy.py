"""What one client key may do beyond what every key may: the models it may use (an
allowlist the operator sets) and its own quotas (overrides of the server's defaults).

Both are the operator's, set with `promptq keys create` and `promptq keys update`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from promptq.config import Settings
from promptq.errors import InvalidRequest, PermissionDenied
from promptq.models import ApiKey
from promptq.patterns import longest_match

# A quota's name on the command line -> the setting that gives its server default.
QUOTAS: Mapping[str, str] = {
    "unfinished_jobs": "key_max_unfinished_jobs",
    "subscriptions": "key_max_subscriptions",
    "templates": "key_max_templates",
    "requests_per_second": "key_max_requests_per_second",
    "redeliveries_per_minute": "key_max_redeliveries_per_minute",
    "open_requests": "key_max_open_requests",
    "high_priority_waiting": "key_max_high_priority_waiting",
}
# Quotas that may be fractional; the others are counts.
FRACTIONAL_QUOTAS = frozenset({"requests_per_second"})


class ModelNotAllowed(PermissionDenied):
    """The key may not use the model; the API answers 403."""


class PolicyError(InvalidRequest, ValueError):
    """An allowlist or quota an operator gave that cannot be used; the message says why."""


def quota(key: ApiKey, settings: Settings, name: str) -> float:
    """The key's own value of a quota, else the server's default."""
    override = (key.quotas or {}).get(name)
    return float(override) if override is not None else float(getattr(settings, QUOTAS[name]))


def check_model(key: ApiKey, model: str, where: str = "") -> None:
    """Refuse a model outside the key's allowlist (a key without one may use any)."""
    if key.models is None or longest_match(key.models, model) is not None:
        return
    raise ModelNotAllowed(
        f"{where + ': ' if where else ''}API key {key.name!r} may not use model {model!r}; "
        f"it may use {', '.join(key.models)}. Ask the operator to allow it "
        "(`promptq keys update KEY --models ...`)"
    )


def parse_models(text: str) -> list[str]:
    """`claude-haiku-*,claude-sonnet-*` -> the patterns; an empty one is refused."""
    patterns = [part.strip() for part in text.split(",")]
    if not patterns or not all(patterns):
        raise PolicyError(
            f"--models {text!r}: give model patterns separated by commas, such as "
            "'claude-haiku-*,claude-sonnet-4-6' (no empty ones)"
        )
    return list(dict.fromkeys(patterns))


def parse_quota(text: str) -> tuple[str, float | int]:
    """`open_requests=10` -> ("open_requests", 10)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    known = ", ".join(QUOTAS)
    if not sep or name not in QUOTAS:
        raise PolicyError(f"--quota {text!r}: give NAME=VALUE, NAME one of {known}")
    try:
        number = float(value)
    except ValueError:
        raise PolicyError(f"--quota {text!r}: {value!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise PolicyError(f"--quota {text!r}: must be more than 0")
    if name in FRACTIONAL_QUOTAS:
        return name, number
    if not number.is_integer():
        raise PolicyError(f"--quota {text!r}: {name} is a count; give a whole number")
    return name, int(number)
