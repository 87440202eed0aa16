"""Hands rate-limit budget to the jobs waiting for it, as soon as it frees up.

Every worker process runs one dispatcher thread. Each round it offers every model with a
queue its budget, head first (priority, then arrival), publishing each admitted job with
its grant; then it sleeps until the nearest moment budget frees up, 5 to 200 ms. Several
dispatchers at once are safe: each offer is one atomic script in Redis.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery

from promptq.broker.publish import publish_job
from promptq.ratelimit.protocol import Limiter

log = logging.getLogger(__name__)

MIN_SLEEP_SECONDS = 0.005
MAX_SLEEP_SECONDS = 0.2
# Grants per model per round, so one busy model cannot starve the others' turns.
MAX_GRANTS_PER_ROUND = 50


class Dispatcher:
    def __init__(self, app: Celery, limiter: Limiter) -> None:
        self.app = app
        self.limiter = limiter
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="promptq-dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def dispatch_once(self) -> float:
        """One round over every waiting model; returns how long to sleep."""
        sleep = MAX_SLEEP_SECONDS
        for model in self.limiter.waiting_models():
            for _ in range(MAX_GRANTS_PER_ROUND):
                offer = self.limiter.dispatch(model)
                if offer.job_id is not None:
                    # Granted jobs go first in the broker: they hold a slot and tokens.
                    publish_job(self.app, offer.job_id, "high", grant=offer.grant)
                    continue
                if not offer.empty:
                    sleep = min(sleep, offer.wait_seconds)
                break
            else:
                sleep = MIN_SLEEP_SECONDS
        return max(MIN_SLEEP_SECONDS, sleep)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pause = self.dispatch_once()
            except Exception:  # Redis away for a moment: try again shortly, never die
                log.exception("dispatching rate-limited jobs failed; retrying in 1s")
                pause = 1.0
            self._stop.wait(pause)
