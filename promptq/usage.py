"""Token usage of one upstream message, read defensively from what the upstream sent."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

# The four counts of Anthropic's `usage` object, in the order the API shows them.
API_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    # All cache writes, whatever their lifetime (Anthropic's own total).
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    # The part of cache_creation_input_tokens written with a 1-hour lifetime, billed at the
    # 1-hour write price (2x base input) instead of the 5-minute one (1.25x). Only known when
    # the upstream sends the `cache_creation` breakdown; otherwise every write is taken as a
    # 5-minute one, Anthropic's default lifetime.
    cache_creation_1h_input_tokens: int = 0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            # bool is an int subclass; a True token count is a bug, not a count of one.
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Usage.{field.name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"Usage.{field.name} must not be negative, got {value}")
        if self.cache_creation_1h_input_tokens > self.cache_creation_input_tokens:
            raise ValueError(
                "Usage.cache_creation_1h_input_tokens "
                f"({self.cache_creation_1h_input_tokens}) is part of "
                f"cache_creation_input_tokens ({self.cache_creation_input_tokens}) "
                "and cannot exceed it"
            )

    @property
    def cache_creation_5m_input_tokens(self) -> int:
        return self.cache_creation_input_tokens - self.cache_creation_1h_input_tokens

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> Usage:
        """The usage of an upstream message (its `usage` object).

        Upstreams (CometAPI, proxies, the simulator) are not all faithful, and a job that
        succeeded must not fail over its bookkeeping: a missing, null, non-integer or
        negative count is taken as 0.
        """
        usage = message.get("usage") if isinstance(message, Mapping) else None
        if not isinstance(usage, Mapping):
            return cls()
        counts = {name: _count(usage.get(name)) for name in API_FIELDS}
        one_hour = 0
        breakdown = usage.get("cache_creation")
        if isinstance(breakdown, Mapping):
            five_minute = _count(breakdown.get("ephemeral_5m_input_tokens"))
            one_hour = _count(breakdown.get("ephemeral_1h_input_tokens"))
            # Anthropic's total is the sum of the breakdown. Some proxies send only the
            # breakdown, or a total that lags it; the larger figure is the one billed.
            counts["cache_creation_input_tokens"] = max(
                counts["cache_creation_input_tokens"], five_minute + one_hour
            )
        return cls(**counts, cache_creation_1h_input_tokens=one_hour)

    def to_api(self) -> dict[str, int]:
        """The four Anthropic usage fields, as the job object and /v1/messages show them."""
        return {name: getattr(self, name) for name in API_FIELDS}


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value
