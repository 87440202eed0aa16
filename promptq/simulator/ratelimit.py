"""Rate limits: token buckets like Anthropic's (continuous refill, capacity = burst of rate).

Requests go through a bucket of `burst_seconds` of their rate (a minute's limit enforced
second by second); input and output tokens through buckets of `token_burst_seconds` (a
minute, as Anthropic's). A call takes its uncached input and `max_tokens` of output when it
starts and gives back the output it did not write when it ends.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from promptq.simulator.config import SimulatorConfig


class TokenBucket:
    def __init__(self, per_minute: int, burst_seconds: float, now: float) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.level = self.capacity
        self.updated = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, cost: float) -> float:
        # A cost above capacity would never fit; it is admitted from a full bucket and leaves
        # it in debt instead, which keeps big requests possible and still paces the rest.
        needed = min(cost, self.capacity)
        return max(0.0, (needed - self.level) / self.rate)

    def headers(self, name: str) -> dict[str, str]:
        until_full = (self.capacity - self.level) / self.rate
        reset = datetime.now(UTC) + timedelta(seconds=max(0.0, until_full))
        prefix = f"anthropic-ratelimit-{name}"
        return {
            f"{prefix}-limit": str(self.per_minute),
            f"{prefix}-remaining": str(max(0, math.floor(self.level))),
            f"{prefix}-reset": reset.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


@dataclass
class Admission:
    admitted: bool
    retry_after: int | None
    headers: dict[str, str]


class RateLimiter:
    """Requests, input tokens and output tokens (max_tokens reserved, the unused refunded)."""

    def __init__(self, config: SimulatorConfig) -> None:
        now = time.monotonic()
        limits = {
            "requests": config.rpm,
            "input-tokens": config.input_tpm,
            "output-tokens": config.output_tpm,
        }
        self._buckets = {
            name: TokenBucket(
                limit,
                config.burst_seconds if name == "requests" else config.token_burst_seconds,
                now,
            )
            for name, limit in limits.items()
            if limit is not None
        }
        self._lock = threading.Lock()
        self._send_headers = config.ratelimit_headers

    def admit(self, input_tokens: int, max_tokens: int) -> Admission:
        costs = {"requests": 1, "input-tokens": input_tokens, "output-tokens": max_tokens}
        with self._lock:
            now = time.monotonic()
            for bucket in self._buckets.values():
                bucket.refill(now)
            wait = max(
                (bucket.wait_for(costs[name]) for name, bucket in self._buckets.items()),
                default=0.0,
            )
            if wait > 0:
                return Admission(False, max(1, math.ceil(wait)), self._headers())
            for name, bucket in self._buckets.items():
                bucket.level -= costs[name]
            return Admission(True, None, self._headers())

    def refund_output(self, tokens: int) -> None:
        with self._lock:
            bucket = self._buckets.get("output-tokens")
            if bucket is not None and tokens > 0:
                bucket.level = min(bucket.capacity, bucket.level + tokens)

    def headers(self) -> dict[str, str]:
        with self._lock:
            now = time.monotonic()
            for bucket in self._buckets.values():
                bucket.refill(now)
            return self._headers()

    def _headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if not self._send_headers:
            return out
        for name, bucket in self._buckets.items():
            out.update(bucket.headers(name))
        return out
