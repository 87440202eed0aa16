"""Rates one client key may use, refused rather than queued when spent: intake requests a
second, redeliveries a minute. Kept in the limiter's Redis, so every API process shares
them. (The key's own `rpm` for its jobs reaching the upstream is the limiter's, not this.)"""

from __future__ import annotations

import redis

from promptq import redis_keys
from promptq.ratelimit.limiter import _script


class RateQuota:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._allow = _script(client, "allow", "quotas")

    def take(self, name: str, key_id: str, per_minute: float, burst_seconds: float) -> float:
        """0 when one unit of the key's `name` quota was taken; else the seconds until one
        is free."""
        wait_ms = self._allow(
            keys=[redis_keys.quota(name, key_id)], args=[per_minute, burst_seconds * 1000]
        )
        return float(wait_ms) / 1000
