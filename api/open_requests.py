"""Requests held open on a job (POST /v1/messages, POST /v1/jobs?wait=N), counted per API
process: each costs a socket, a task and looks at the database while it waits, so one key
may hold only PROMPTQ_KEY_MAX_OPEN_REQUESTS of them (429) and the process
PROMPTQ_MAX_OPEN_REQUESTS (503: another process may have room). A refused request makes
nothing: the check comes before its job is created."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from promptq.errors import RateLimited, Unavailable

RETRY_AFTER_SECONDS = 5.0


class OpenRequests:
    # Used from the event loop only, so plain counters need no lock.
    def __init__(self, per_key: int, total: int) -> None:
        self.per_key = per_key  # the server default; a key may have its own
        self.total = total
        self._by_key: Counter[str] = Counter()

    @contextmanager
    def hold(self, key_id: str, per_key: float | None = None) -> Iterator[None]:
        most = self.per_key if per_key is None else per_key
        if self._by_key[key_id] >= most:
            raise RateLimited(
                f"this API key holds {most:g} requests open on this promptq process "
                "already (PROMPTQ_KEY_MAX_OPEN_REQUESTS, or the key's own quota): wait for "
                "one to finish, or submit without waiting and poll GET /v1/jobs/ID or take a "
                "webhook",
                RETRY_AFTER_SECONDS,
            )
        if sum(self._by_key.values()) >= self.total:
            raise Unavailable(
                f"this promptq process holds {self.total} requests open already "
                "(PROMPTQ_MAX_OPEN_REQUESTS); retry shortly, or poll GET /v1/jobs/ID instead "
                "of waiting",
                RETRY_AFTER_SECONDS,
            )
        self._by_key[key_id] += 1
        try:
            yield
        finally:
            self._by_key[key_id] -= 1
            if self._by_key[key_id] <= 0:
                del self._by_key[key_id]
