"""Reading the upstream's own account of its limits from `anthropic-ratelimit-*` headers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

# Header name part -> the limiter's name for the dimension.
DIMENSIONS = {"requests": "req", "input-tokens": "inp", "output-tokens": "out"}


@dataclass(frozen=True)
class ReportedLimits:
    # Per-minute limits the upstream says it enforces (0: not reported).
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    # What it says is left in each bucket ("req", "inp", "out"), where it says.
    remaining: Mapping[str, int] = field(default_factory=dict)
    # Milliseconds until each dimension it reports as exhausted (remaining 0) is full again.
    exhausted_ms: Mapping[str, float] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return bool(self.requests or self.input_tokens or self.output_tokens or self.remaining)

    def limit(self, dim: str) -> int:
        return {"req": self.requests, "inp": self.input_tokens, "out": self.output_tokens}[dim]


def read_rate_limit_headers(
    headers: Mapping[str, str], now: datetime | None = None
) -> ReportedLimits:
    now = now or datetime.now(UTC)
    limits: dict[str, int] = {}
    remaining: dict[str, int] = {}
    exhausted_ms: dict[str, float] = {}
    for name, dim in DIMENSIONS.items():
        prefix = f"anthropic-ratelimit-{name}-"
        limit = _int(headers.get(prefix + "limit"))
        if limit:
            limits[dim] = limit
        left = _int(headers.get(prefix + "remaining"))
        if left is None:
            continue
        remaining[dim] = max(0, left)
        if left <= 0:
            reset = _time(headers.get(prefix + "reset"))
            if reset is not None:
                exhausted_ms[dim] = max(0.0, (reset - now).total_seconds() * 1000)
    return ReportedLimits(
        requests=limits.get("req", 0),
        input_tokens=limits.get("inp", 0),
        output_tokens=limits.get("out", 0),
        remaining=remaining,
        exhausted_ms=exhausted_ms,
    )


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
