"""Stats: calls, outcomes and concurrency, as `GET /_sim/stats` shows them."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from promptq.simulator.answers import Answer


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.calls = 0
            self.succeeded = 0
            self.by_status: Counter[str] = Counter()
            self.by_prompt: Counter[str] = Counter()
            # The anthropic-beta header each prompt last came with (what a client asked for).
            self.beta_by_prompt: dict[str, str] = {}
            # Calls arriving in each wall-clock second: what an upstream's per-second
            # enforcement of a per-minute limit sees.
            self.by_second: Counter[int] = Counter()
            self.max_in_flight = self.in_flight
            # Calls of the other endpoints (models, count_tokens), which `calls` leaves out.
            self.by_endpoint: Counter[str] = Counter()

    def enter(self) -> None:
        with self._lock:
            self.calls += 1
            self.by_second[int(time.time())] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self, answer: Answer) -> None:
        with self._lock:
            self.in_flight -= 1
            self.by_status["dropped" if answer.drop else str(answer.status)] += 1
            self.succeeded += answer.succeeded

    def side_call(self, endpoint: str) -> None:
        with self._lock:
            self.by_endpoint[endpoint] += 1

    def prompt(self, text: str, beta: str | None = None) -> None:
        with self._lock:
            self.by_prompt[text[:60]] += 1
            if beta:
                self.beta_by_prompt[text[:60]] = beta

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": self.calls,
                "succeeded": self.succeeded,
                "by_status": dict(self.by_status),
                "calls_by_prompt": dict(self.by_prompt),
                "beta_by_prompt": dict(self.beta_by_prompt),
                "calls_by_endpoint": dict(self.by_endpoint),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "calls_by_second": {str(second): n for second, n in sorted(self.by_second.items())},
            }
