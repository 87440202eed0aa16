"""Whether the broker answers, asked before a job is stored.

A job is accepted only if it can be published: with Redis away the API answers 503 before
writing anything, so the client retries instead of holding a job id that would sit unrun.
The answer is kept for a second, so intake does not ping Redis on every request.
"""

from __future__ import annotations

import time

import redis

from promptq.errors import Unavailable
from promptq.redis_roles import redis_client

CHECK_EVERY_SECONDS = 1.0


class BrokerCheck:
    def __init__(self, redis_url: str) -> None:
        """`redis_url`: the broker's (PROMPTQ_BROKER_URL, else PROMPTQ_REDIS_URL)."""
        self._client = redis_client(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._checked_at = 0.0
        self._answers = True

    def answers(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at >= CHECK_EVERY_SECONDS:
            try:
                self._answers = bool(self._client.ping())
            except redis.RedisError:
                self._answers = False
            self._checked_at = now
        return self._answers


def require_broker(check: BrokerCheck, what: str) -> None:
    """A 503 before anything is stored when the broker is away (`what`: "job", "batch")."""
    if not check.answers():
        raise Unavailable(
            f"the broker (Redis) is not answering, so the {what} was not accepted; retry in a "
            "few seconds"
        )
