"""The upstream: one call of POST /v1/messages from headers and body to an answer."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from promptq.simulator import catalog
from promptq.simulator.answers import Answer, ApiError, _json_answer, anthropic_error
from promptq.simulator.config import _PROBABILITIES, SimulatorConfig
from promptq.simulator.directives import Directives, parse_directives
from promptq.simulator.faults import _ANTHROPIC_FAULTS, _IMMEDIATE_FAULTS, fault_answer
from promptq.simulator.model import (
    PromptCache,
    build_message,
    canonical,
    last_user_text,
    prompt_segments,
    tokens,
)
from promptq.simulator.ratelimit import RateLimiter
from promptq.simulator.stats import Stats
from promptq.simulator.validation import _invalid, validate_request

log = logging.getLogger(__package__)  # "promptq.simulator", as when it was one module


def _api_key(headers: Mapping[str, str]) -> str:
    key = headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _authenticate(config: SimulatorConfig, headers: Mapping[str, str]) -> None:
    key = _api_key(headers)
    if not key:
        raise ApiError(401, "authentication_error", "x-api-key header is required")
    if config.api_key is not None and not secrets.compare_digest(key, config.api_key):
        raise ApiError(401, "authentication_error", "invalid x-api-key")


def _json_body(config: SimulatorConfig, headers: Mapping[str, str], raw: bytes | None) -> Any:
    if raw is None:
        raise ApiError(413, "request_too_large", _ANTHROPIC_FAULTS["413"][2])
    _authenticate(config, headers)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise _invalid(f"request body is not valid JSON: {error}") from None


def _require_model_list(config: SimulatorConfig) -> None:
    if not config.list_models:
        # As an Anthropic-compatible proxy without the endpoint answers.
        raise ApiError(404, "not_found_error", "The requested resource could not be found.")


class Upstream:
    def __init__(self, config: SimulatorConfig) -> None:
        self.stats = Stats()
        self.cache = PromptCache()
        self._lock = threading.Lock()
        self._directive_calls: Counter[str] = Counter()
        self.configure(config)

    def configure(self, config: SimulatorConfig) -> None:
        with self._lock:
            # Swapped as whole objects so that a call in progress keeps a consistent view.
            self.config = config
            self.limiter = RateLimiter(config)
            self._rng = random.Random(config.seed)

    def reset(self) -> None:
        self.stats.reset()
        self.cache.clear()
        with self._lock:
            self._directive_calls.clear()
            self.limiter = RateLimiter(self.config)

    def handle(self, headers: Mapping[str, str], raw: bytes | None) -> Answer:
        request_id = "req_" + secrets.token_hex(12)
        self.stats.enter()
        try:
            answer = self._handle(request_id, headers, raw)
        except ApiError as error:
            answer = anthropic_error(error.status, error.error_type, error.message, request_id)
        except Exception:
            log.exception("simulator: unexpected error")
            answer = anthropic_error(500, "api_error", "Internal server error", request_id)
        answer.headers["request-id"] = request_id
        self.stats.leave(answer)
        return answer

    def side_call(
        self, endpoint: str, headers: Mapping[str, str], call: Callable[[SimulatorConfig], Any]
    ) -> Answer:
        """A call of an endpoint other than /v1/messages: authenticated like it, counted
        apart (`calls_by_endpoint`), and never rate limited or faulted."""
        request_id = "req_" + secrets.token_hex(12)
        self.stats.side_call(endpoint)
        with self._lock:
            config = self.config
        try:
            _authenticate(config, headers)
            answer = _json_answer(200, call(config))
        except ApiError as error:
            answer = anthropic_error(error.status, error.error_type, error.message, request_id)
        answer.headers["request-id"] = request_id
        return answer

    def models(self, headers: Mapping[str, str], query: dict[str, list[str]]) -> Answer:
        def page(config: SimulatorConfig) -> dict[str, Any]:
            _require_model_list(config)
            return catalog.list_page(query)

        return self.side_call("models", headers, page)

    def model(self, headers: Mapping[str, str], model_id: str) -> Answer:
        def found(config: SimulatorConfig) -> dict[str, str]:
            _require_model_list(config)
            return catalog.get_model(model_id)

        return self.side_call("models", headers, found)

    def count_tokens(self, headers: Mapping[str, str], raw: bytes | None) -> Answer:
        def count(config: SimulatorConfig) -> dict[str, int]:
            body = validate_request(_json_body(config, headers, raw), counting=True)
            # What the same prompt is charged as input by /v1/messages, cache or not.
            return {"input_tokens": max(1, tokens(sum(s.chars for s in prompt_segments(body))))}

        return self.side_call("count_tokens", headers, count)

    def _draw(self, config: SimulatorConfig) -> tuple[str | None, float]:
        with self._lock:
            jitter = self._rng.uniform(0, config.latency_jitter) if config.latency_jitter else 0.0
            u = self._rng.random()
        names = ("429", "500", "529", "html", "drop", "openai-500")
        for name, p in zip(names, (getattr(config, p) for p in _PROBABILITIES), strict=True):
            if u < p:
                return name, jitter
            u -= p
        return None, jitter

    def _directive_fault(self, body: dict[str, Any], directives: Directives) -> str | None:
        if not directives.faults:
            return None
        key = hashlib.sha256(canonical(body).encode()).hexdigest()
        with self._lock:
            index = self._directive_calls[key]
            self._directive_calls[key] += 1
        return directives.fault_for_call(index)

    def _handle(self, request_id: str, headers: Mapping[str, str], raw: bytes | None) -> Answer:
        with self._lock:
            config, limiter = self.config, self.limiter
        body = validate_request(_json_body(config, headers, raw))
        prompt = last_user_text(body["messages"])
        self.stats.prompt(prompt, headers.get("anthropic-beta"))
        directives = parse_directives(prompt)

        fault = self._directive_fault(body, directives)
        random_fault, jitter = self._draw(config)
        ratelimit = limiter.headers
        if fault in _IMMEDIATE_FAULTS or (fault is None and random_fault == "429"):
            return fault_answer(fault or "429", request_id, ratelimit())

        segments = prompt_segments(body)
        cache = self.cache.look_up(body["model"], segments)
        total_in = max(1, tokens(sum(s.chars for s in segments)))
        input_tokens = max(1, total_in - cache.read - cache.write)
        if fault is None:
            # Cache reads do not count against input limits, as with Anthropic.
            admission = limiter.admit(total_in - cache.read, body["max_tokens"])
            if not admission.admitted:
                retry = {"retry-after": str(admission.retry_after), **admission.headers}
                text = "This request would exceed your organization's rate limit."
                return anthropic_error(429, "rate_limit_error", text, request_id, retry)
            fault = random_fault
            if fault is not None:
                limiter.refund_output(body["max_tokens"])

        delay = config.latency + jitter + directives.latency
        if delay > 0:
            time.sleep(delay)
        if fault is not None:
            return fault_answer(fault, request_id, ratelimit())
        message = build_message(body, (input_tokens, cache), directives.output_tokens)
        self.cache.remember(cache)
        limiter.refund_output(body["max_tokens"] - message["usage"]["output_tokens"])
        answer = _json_answer(200, message, ratelimit())
        answer.succeeded = True
        return answer
