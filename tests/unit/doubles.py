"""Stand-ins for the unit room, each for a protocol promptq itself defines: the upstream
(promptq.jobs.runner.Upstream) as the simulator called in this process, and a clock moved
on by hand for the MemoryLimiter."""

from __future__ import annotations

import json
import time
from typing import Any

from promptq.simulator import SimulatorConfig
from promptq.simulator.upstream import Upstream as SimulatedUpstream
from promptq.upstream import Outcome, UpstreamResult
from promptq.upstream.classify import classify_response


class InProcessUpstream:
    """The upstream simulator's own request handler, called as a function instead of over
    HTTP: the same answers (faults asked for with `[[sim:...]]` in the prompt, usage, rate
    limits), classified by the same code the HTTP client uses."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.simulator = SimulatedUpstream(config or SimulatorConfig())
        self.requests: list[dict[str, Any]] = []

    @property
    def calls(self) -> int:
        return len(self.requests)

    def create_message(self, params: dict[str, Any], beta: str | None = None) -> UpstreamResult:
        self.requests.append(params)
        headers = {"x-api-key": "sk-unit-test", "content-type": "application/json"}
        if beta:
            headers["anthropic-beta"] = beta
        started = time.monotonic()
        answer = self.simulator.handle(headers, json.dumps(params).encode())
        latency_ms = round((time.monotonic() - started) * 1000)
        if answer.drop:
            # What the HTTP client makes of a connection closed without an answer.
            return UpstreamResult(
                outcome=Outcome.TRANSIENT,
                status_code=None,
                latency_ms=latency_ms,
                request_id=None,
                message=None,
                error_type="connection_error",
                error_message="the simulator dropped the connection",
                retry_after=None,
                rate_limit_headers={},
            )
        response_headers = dict(answer.headers)
        if answer.content_type:
            response_headers["content-type"] = answer.content_type
        return classify_response(answer.status, response_headers, answer.body, latency_ms)


class ManualClock:
    """Seconds that pass only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
