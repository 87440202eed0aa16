"""Webhook deliveries' own threads in a worker process.

A delivery waits on somebody else's server for up to 15 s; a key whose receivers never
answer would otherwise hold as many of the worker's threads as it has deliveries, and jobs
and everyone else's webhooks would wait behind them. So the Celery task only claims a
delivery and hands the sending to this pool: a fixed number of threads of its own
(PROMPTQ_WEBHOOK_CONCURRENCY), of which one key may hold only a few at once
(PROMPTQ_WEBHOOK_MAX_IN_FLIGHT_PER_KEY). A delivery that finds no room stays pending, put
behind the other due ones: the sweeper publishes it again on a later pass. The claim's lease
(60 s) covers a process that dies mid-send: the delivery becomes due again and is sent once
more, with the same webhook-id, so receivers can tell.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class DeliveryPool:
    def __init__(self, threads: int, per_key: int) -> None:
        self.threads = threads
        self.per_key = per_key
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="webhook")
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()

    def try_reserve(self, key_id: str) -> bool:
        """Room for one more delivery of this key, taken now; False when the pool or the
        key's share of it is full."""
        with self._lock:
            if sum(self._in_flight.values()) >= self.threads:
                return False
            if self._in_flight[key_id] >= self.per_key:
                return False
            self._in_flight[key_id] += 1
            return True

    def release(self, key_id: str) -> None:
        with self._lock:
            self._in_flight[key_id] -= 1
            if self._in_flight[key_id] <= 0:
                del self._in_flight[key_id]

    def submit(self, key_id: str, send: Callable[[], object]) -> None:
        """Run `send` on the pool's threads, with room reserved by try_reserve."""

        def run() -> None:
            try:
                send()
            except Exception:
                # The claim's lease runs out and the sweeper sends it again.
                log.exception("webhook delivery failed to complete; it will be sent again")
            finally:
                self.release(key_id)

        self._executor.submit(run)

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return dict(self._in_flight)

    def shutdown(self) -> None:
        """Let the deliveries being sent finish (each ends within its 15 s timeout)."""
        self._executor.shutdown(wait=True)
