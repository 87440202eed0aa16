"""Reading the upstream's own account of its limits from `anthropic-ratelimit-*` headers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

DIMENSIONS = {"requests": "req", "input-tokens": "inp", "output-tokens": "out"}


@dataclass(frozen=True)
class ReportedLimits:
    # Per-minute limits the upstream says it enforces (0: not reported).
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    # Milliseconds until a dimension it reports as exhausted refills (0: none exhausted).
    pause_ms: float = 0.0

    @property
    def any(self) -> bool:
        return bool(self.requests or self.input_tokens or self.output_tokens or self.pause_ms)


def read_rate_limit_headers(
    headers: Mapping[str, str], now: datetime | None = None
) -> ReportedLimits:
    now = now or datetime.now(UTC)
    limits: dict[str, int] = {}
    pause_ms = 0.0
    for name in DIMENSIONS:
        prefix = f"anthropic-ratelimit-{name}-"
        limit = _int(headers.get(prefix + "limit"))
        if limit:
            limits[name] = limit
        if _int(headers.get(prefix + "remaining")) == 0 and headers.get(prefix + "remaining"):
            reset = _time(headers.get(prefix + "reset"))
            if reset is not None:
                pause_ms = max(pause_ms, (reset - now).total_seconds() * 1000)
    return ReportedLimits(
        requests=limits.get("requests", 0),
        input_tokens=limits.get("input-tokens", 0),
        output_tokens=limits.get("output-tokens", 0),
        pause_ms=max(0.0, pause_ms),
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
