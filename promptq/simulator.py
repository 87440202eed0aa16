"""The upstream simulator: an Anthropic-faithful fake of `POST /v1/messages`.

It is a real HTTP server so that promptq is tested through the same sockets, timeouts and
status codes it meets in production. Behaviour that tests need per call (a 529 twice, a
dropped connection, two seconds of latency) is asked for inside the prompt with directives:

    [[sim:FAULT]] or [[sim:FAULT xN]]   the first N calls with this exact body fail with FAULT
    [[sim:latency=S]]                   this call takes S more seconds

Several fault directives in one message apply in turn: `[[sim:429 x1]] [[sim:500 x2]]` fails
once with 429, twice with 500, then succeeds. Behaviour for every call (latency, rate limits,
random faults) comes from `SimulatorConfig`, live-patchable through `POST /_sim/config`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import random
import re
import secrets
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeGuard
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

# Anthropic's documented size limit for a Messages request.
MAX_BODY_BYTES = 32 * 1024 * 1024

# Chars per token: the rule of thumb Anthropic documents, good enough for usage that grows.
CHARS_PER_TOKEN = 4

# ---------------------------------------------------------------------------------------------
# Configuration


_PROBABILITIES = ("p_429", "p_500", "p_529", "p_malformed", "p_drop", "p_openai_error")
_SECONDS = ("latency", "latency_jitter", "burst_seconds")
_LIMITS = ("rpm", "input_tpm", "output_tpm")


@dataclass
class SimulatorConfig:
    latency: float = 0.0
    latency_jitter: float = 0.0
    rpm: int | None = None
    input_tpm: int | None = None
    output_tpm: int | None = None
    # Bucket capacity in seconds of rate: 1.0 enforces a minute's limit second by second.
    burst_seconds: float = 1.0
    p_429: float = 0.0
    p_500: float = 0.0
    p_529: float = 0.0
    p_malformed: float = 0.0
    p_drop: float = 0.0
    p_openai_error: float = 0.0
    seed: int | None = None
    api_key: str | None = None

    def __post_init__(self) -> None:
        # Checked here so that `replace()` (the /_sim/config patch) is validated too.
        for name in (*_SECONDS, *_PROBABILITIES):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, not {value!r}")
            setattr(self, name, float(value))
        for name in _PROBABILITIES:
            if getattr(self, name) > 1:
                raise ValueError(f"{name} must be a probability between 0 and 1")
        if sum(getattr(self, name) for name in _PROBABILITIES) > 1:
            raise ValueError("the fault probabilities must add up to at most 1")
        if self.burst_seconds <= 0:
            raise ValueError("burst_seconds must be > 0")
        for name in (*_LIMITS, "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer or null, not {value!r}")
        for name in _LIMITS:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or null")
        if self.api_key is not None and not isinstance(self.api_key, str):
            raise ValueError("api_key must be a string or null")

    def patched(self, changes: Mapping[str, Any]) -> SimulatorConfig:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        return replace(self, **changes)

    def public(self) -> dict[str, Any]:
        shown = asdict(self)
        shown["api_key"] = "set" if self.api_key else None
        return shown


# ---------------------------------------------------------------------------------------------
# Rate limits: token buckets like Anthropic's (continuous refill, capacity = burst of rate)


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
            name: TokenBucket(limit, config.burst_seconds, now)
            for name, limit in limits.items()
            if limit is not None
        }
        self._lock = threading.Lock()

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
        for name, bucket in self._buckets.items():
            out.update(bucket.headers(name))
        return out


# ---------------------------------------------------------------------------------------------
# Answers


@dataclass
class Answer:
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the socket without a word
    succeeded: bool = False  # a message was delivered


def _json_answer(status: int, payload: Any, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, json.dumps(payload).encode(), headers=dict(headers or {}))


class ApiError(Exception):
    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def anthropic_error(
    status: int,
    error_type: str,
    message: str,
    request_id: str,
    headers: dict[str, str] | None = None,
) -> Answer:
    payload = {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": request_id,
    }
    return _json_answer(status, payload, headers)


def openai_error(status: int, message: str, code: str) -> Answer:
    error = {"message": message, "type": "comet_api_error", "param": None, "code": code}
    return _json_answer(status, {"error": error})


def _html(status: int, title: str, text: str) -> Answer:
    page = (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<p>{text}</p>\r\n"
        "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )
    return Answer(status, page.encode(), "text/html; charset=utf-8")


# ---------------------------------------------------------------------------------------------
# Faults, by name, as directives and random faults produce them

_ANTHROPIC_FAULTS = {
    "400": (400, "invalid_request_error", "simulated invalid request"),
    "401": (401, "authentication_error", "invalid x-api-key"),
    "403": (
        403,
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    "404": (404, "not_found_error", "The requested resource could not be found."),
    "413": (413, "request_too_large", "Request exceeds the maximum allowed number of bytes."),
    "429": (429, "rate_limit_error", "Number of requests has exceeded your rate limit."),
    "500": (500, "api_error", "Internal server error"),
    "529": (529, "overloaded_error", "Overloaded"),
}
_PROXY_FAULTS: dict[str, Callable[[], Answer]] = {
    "502": lambda: _html(502, "502 Bad Gateway", "The upstream server did not answer."),
    "503": lambda: Answer(
        503,
        b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
        "text/plain",
    ),
    "504": lambda: _html(504, "504 Gateway Time-out", "The upstream server timed out."),
    "524": lambda: _html(524, "api.cometapi.com | 524: A timeout occurred", "Error code 524"),
    "html": lambda: _html(502, "Bad gateway", "Error code 502. Please try again in a few minutes."),
    "empty": lambda: Answer(200, b""),
    "drop": lambda: Answer(0, drop=True),
    "openai-500": lambda: openai_error(500, "internal error (simulated)", "internal_error"),
    "openai-invalid": lambda: openai_error(
        500, "invalid request: the upstream rejected the parameters (simulated)", "invalid_request"
    ),
    "redirect": lambda: Answer(301, b"", None, {"location": "/v2/messages"}),
}
FAULTS = frozenset(_ANTHROPIC_FAULTS) | frozenset(_PROXY_FAULTS)
# Faults that a client gets at once; the rest happen "while the model works", after latency.
_IMMEDIATE_FAULTS = frozenset({"400", "401", "403", "404", "413", "429", "redirect"})


def fault_answer(fault: str, request_id: str, ratelimit_headers: dict[str, str]) -> Answer:
    if fault in _ANTHROPIC_FAULTS:
        status, error_type, message = _ANTHROPIC_FAULTS[fault]
        headers = {"retry-after": "1", **ratelimit_headers} if status == 429 else {}
        return anthropic_error(status, error_type, message, request_id, headers)
    return _PROXY_FAULTS[fault]()


# ---------------------------------------------------------------------------------------------
# Directives

_DIRECTIVE = re.compile(r"\[\[sim:([^\]]*)\]\]")
_FAULT_DIRECTIVE = re.compile(r"^\s*([a-z0-9-]+)(?:\s+x(\d+))?\s*$")
_LATENCY_DIRECTIVE = re.compile(r"^\s*latency\s*=\s*(\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True)
class Directives:
    faults: tuple[tuple[str, int | None], ...] = ()  # (fault, times; None = forever)
    latency: float = 0.0

    def fault_for_call(self, call_index: int) -> str | None:
        seen = 0
        for fault, times in self.faults:
            if times is None or call_index < seen + times:
                return fault
            seen += times
        return None


def parse_directives(text: str) -> Directives:
    faults: list[tuple[str, int | None]] = []
    latency = 0.0
    for inner in _DIRECTIVE.findall(text):
        if match := _LATENCY_DIRECTIVE.match(inner):
            latency += float(match.group(1))
        elif (match := _FAULT_DIRECTIVE.match(inner)) and match.group(1) in FAULTS:
            times = match.group(2)
            faults.append((match.group(1), int(times) if times else None))
        else:
            raise ApiError(
                400,
                "invalid_request_error",
                f"simulator: unknown directive [[sim:{inner}]]; faults are "
                f"{', '.join(sorted(FAULTS))}, optionally followed by xN, or latency=S",
            )
    return Directives(tuple(faults), latency)


# ---------------------------------------------------------------------------------------------
# Validation, the way Anthropic answers

_TOP_LEVEL_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "stream",
        "metadata",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        "container",
        "mcp_servers",
        "context_management",
    }
)


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_blocks(where: str, blocks: list[Any]) -> None:
    for j, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise _invalid(f"{where}.{j}: Input should be a valid dictionary")
        if not isinstance(block.get("type"), str):
            raise _invalid(f"{where}.{j}.type: Field required")
        if block["type"] == "text":
            if not isinstance(block.get("text"), str):
                raise _invalid(f"{where}.{j}.text: Field required")
            if not block["text"]:
                raise _invalid(f"{where}: text content blocks must be non-empty")


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise _invalid("messages: Field required")
    if not isinstance(messages, list):
        raise _invalid("messages: Input should be a valid list")
    if not messages:
        raise _invalid("messages: at least one message is required")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages.{i}: Input should be a valid dictionary")
        if message.get("role") not in ("user", "assistant"):
            raise _invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        final_assistant = i == len(messages) - 1 and message["role"] == "assistant"
        if isinstance(content, str):
            if not content and not final_assistant:
                raise _invalid(
                    f"messages.{i}: all messages must have non-empty content except for "
                    "the optional final assistant message"
                )
        elif isinstance(content, list):
            _check_blocks(f"messages.{i}.content", content)
        else:
            raise _invalid(
                f"messages.{i}.content: Input should be a valid string or a list of content blocks"
            )


def _check_thinking(body: dict[str, Any]) -> None:
    thinking = body.get("thinking")
    if thinking is None:
        return
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
        raise _invalid("thinking.type: Input should be 'enabled' or 'disabled'")
    if thinking["type"] != "enabled":
        return
    budget = thinking.get("budget_tokens")
    if not _is_int(budget):
        raise _invalid("thinking.enabled.budget_tokens: Field required")
    if budget < 1024:
        raise _invalid(
            "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
        )
    if budget >= body["max_tokens"]:
        raise _invalid("`max_tokens` must be greater than `thinking.budget_tokens`.")
    if "temperature" in body and body["temperature"] != 1:
        raise _invalid("`temperature` may only be set to 1 when thinking is enabled.")


def validate_request(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _invalid("request body: Input should be a valid dictionary")
    extra = sorted(set(body) - _TOP_LEVEL_FIELDS)
    if extra:
        raise _invalid(f"{extra[0]}: Extra inputs are not permitted")
    if "model" not in body:
        raise _invalid("model: Field required")
    if not isinstance(body["model"], str):
        raise _invalid("model: Input should be a valid string")
    if "max_tokens" not in body:
        raise _invalid("max_tokens: Field required")
    if not _is_int(body["max_tokens"]):
        raise _invalid("max_tokens: Input should be a valid integer")
    if body["max_tokens"] < 1:
        raise _invalid("max_tokens: Input should be greater than or equal to 1")
    _check_messages(body.get("messages"))
    system = body.get("system")
    if system is not None:
        if isinstance(system, list):
            _check_blocks("system", system)
        elif not isinstance(system, str):
            raise _invalid("system: Input should be a valid string or a list of text blocks")
    if "temperature" in body:
        temperature = body["temperature"]
        if not _is_number(temperature):
            raise _invalid("temperature: Input should be a valid number")
        if not 0 <= temperature <= 1:
            raise _invalid("temperature: Input should be between 0 and 1")
    stops = body.get("stop_sequences")
    if stops is not None and not (
        isinstance(stops, list) and all(isinstance(s, str) for s in stops)
    ):
        raise _invalid("stop_sequences: Input should be a valid list of strings")
    if body.get("stream"):
        raise _invalid("stream: the simulator answers whole messages only, not streams")
    _check_thinking(body)
    if not body["model"].startswith("claude-"):
        raise ApiError(404, "not_found_error", f"model: {body['model']}")
    return body


# ---------------------------------------------------------------------------------------------
# The model: deterministic replies, usage and prompt caching


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            texts = [b.get("text", "") for b in content if isinstance(b, dict)]
            return "\n".join(t for t in texts if isinstance(t, str) and t)
    return ""


@dataclass(frozen=True)
class Segment:
    """One piece of the prompt in cache order (tools, system, messages)."""

    chars: int
    key: str
    breakpoint: bool


def _block_segment(scope: str, block: dict[str, Any]) -> Segment:
    plain = {k: v for k, v in block.items() if k != "cache_control"}
    text = block.get("text")
    chars = len(text) if isinstance(text, str) else len(canonical(plain))
    return Segment(chars, f"{scope}:{canonical(plain)}", "cache_control" in block)


def prompt_segments(body: dict[str, Any]) -> list[Segment]:
    segments = [_block_segment("tool", t) for t in body.get("tools") or [] if isinstance(t, dict)]
    system = body.get("system")
    if isinstance(system, str):
        segments.append(Segment(len(system), f"system:{system}", False))
    elif isinstance(system, list):
        segments += [_block_segment("system", block) for block in system]
    for message in body["messages"]:
        role, content = message["role"], message["content"]
        if isinstance(content, str):
            segments.append(Segment(len(content), f"{role}:{canonical(content)}", False))
        else:
            segments += [_block_segment(role, block) for block in content]
    return segments


@dataclass(frozen=True)
class CacheUsage:
    read: int
    write: int
    keys: tuple[str, ...]  # what to remember once the call succeeds


class PromptCache:
    """Prefixes up to each cache_control breakpoint, by hash; the longest known one is read."""

    def __init__(self) -> None:
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def look_up(self, model: str, segments: list[Segment]) -> CacheUsage:
        digest = hashlib.sha256(model.encode())
        chars = 0
        prefixes: list[tuple[str, int]] = []
        for segment in segments:
            digest.update(b"\x00" + segment.key.encode())
            chars += segment.chars
            if segment.breakpoint:
                prefixes.append((digest.hexdigest(), tokens(chars)))
        if not prefixes:
            return CacheUsage(0, 0, ())
        with self._lock:
            read = max((n for key, n in prefixes if key in self._known), default=0)
        return CacheUsage(read, prefixes[-1][1] - read, tuple(key for key, _ in prefixes))

    def remember(self, usage: CacheUsage) -> None:
        with self._lock:
            self._known.update(usage.keys)

    def clear(self) -> None:
        with self._lock:
            self._known.clear()


_ADJECTIVES = ("quiet", "bright", "patient", "curious", "steady", "gentle", "brisk", "clever")
_NOUNS = ("answer", "thought", "note", "reply", "idea", "summary", "remark", "point")


def _reply_texts(body: dict[str, Any]) -> tuple[str, str]:
    """(thinking, text), both a pure function of the prompt."""
    digest = hashlib.sha256(
        canonical([body["model"], body.get("system"), body["messages"]]).encode()
    ).hexdigest()
    echo = " ".join(last_user_text(body["messages"]).split())[:80]
    adjective = _ADJECTIVES[int(digest[0:2], 16) % len(_ADJECTIVES)]
    noun = _NOUNS[int(digest[2:4], 16) % len(_NOUNS)]
    text = f'Simulated {adjective} {noun} {digest[:8]}. You said: "{echo}"'
    thinking = f'The user wrote "{echo[:40]}". A short {noun} will do ({digest[8:16]}).'
    return thinking, text


def build_message(body: dict[str, Any], usage_in: tuple[int, CacheUsage]) -> dict[str, Any]:
    input_tokens, cache = usage_in
    thinking, text = _reply_texts(body)
    if (body.get("thinking") or {}).get("type") != "enabled":
        thinking = ""
    stop_reason, stop_sequence = "end_turn", None
    hits = [(text.find(s), s) for s in body.get("stop_sequences") or [] if s and s in text]
    if hits:
        at, stop_sequence = min(hits)
        stop_reason, text = "stop_sequence", text[:at]
    budget = body["max_tokens"] * CHARS_PER_TOKEN
    if len(thinking) + len(text) > budget:
        stop_reason, stop_sequence = "max_tokens", None
        thinking = thinking[:budget]
        text = text[: budget - len(thinking)]
    content: list[dict[str, Any]] = []
    if thinking:
        signature = base64.b64encode(hashlib.sha512(thinking.encode()).digest()).decode()
        content.append({"type": "thinking", "thinking": thinking, "signature": signature})
    if text or not content:
        content.append({"type": "text", "text": text})
    output_tokens = min(body["max_tokens"], max(1, tokens(len(thinking) + len(text))))
    return {
        "id": "msg_" + secrets.token_hex(12),
        "type": "message",
        "role": "assistant",
        "content": content,
        "model": body["model"],
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": cache.write,
            "cache_read_input_tokens": cache.read,
        },
    }


# ---------------------------------------------------------------------------------------------
# Stats


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
            self.max_in_flight = self.in_flight

    def enter(self) -> None:
        with self._lock:
            self.calls += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self, answer: Answer) -> None:
        with self._lock:
            self.in_flight -= 1
            self.by_status["dropped" if answer.drop else str(answer.status)] += 1
            self.succeeded += answer.succeeded

    def prompt(self, text: str) -> None:
        with self._lock:
            self.by_prompt[text[:60]] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": self.calls,
                "succeeded": self.succeeded,
                "by_status": dict(self.by_status),
                "calls_by_prompt": dict(self.by_prompt),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
            }


# ---------------------------------------------------------------------------------------------
# The upstream: one call of POST /v1/messages from headers and body to an answer


def _api_key(headers: Mapping[str, str]) -> str:
    key = headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


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
        if raw is None:
            raise ApiError(413, "request_too_large", _ANTHROPIC_FAULTS["413"][2])
        key = _api_key(headers)
        if not key:
            raise ApiError(401, "authentication_error", "x-api-key header is required")
        if config.api_key is not None and not secrets.compare_digest(key, config.api_key):
            raise ApiError(401, "authentication_error", "invalid x-api-key")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise _invalid(f"request body is not valid JSON: {error}") from None
        body = validate_request(body)
        prompt = last_user_text(body["messages"])
        self.stats.prompt(prompt)
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
        message = build_message(body, (input_tokens, cache))
        self.cache.remember(cache)
        limiter.refund_output(body["max_tokens"] - message["usage"]["output_tokens"])
        answer = _json_answer(200, message, ratelimit())
        answer.succeeded = True
        return answer


# ---------------------------------------------------------------------------------------------
# HTTP: the standard library's ThreadingHTTPServer, because we need socket-level control (drop
# a connection, send a malformed body) that frameworks hide, and one thread per request makes
# simulated latency free: a sleeping call holds its own thread, never the others.

_REASONS = {524: "A Timeout Occurred", 529: "Overloaded"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients' connection pools expect
    server_version = "promptq-simulator"
    timeout = 300  # frees the thread of an idle keep-alive connection
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("simulator %s " + format, self.client_address[0], *args)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/_sim/stats":
            self._send(_json_answer(200, self.server.upstream.stats.snapshot()))
        else:
            self._not_found()

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        raw = self._read_body()
        upstream = self.server.upstream
        if path == "/v1/messages":
            headers = {k.lower(): v for k, v in self.headers.items()}
            self._send(upstream.handle(headers, raw))
        elif path == "/_sim/reset":
            upstream.reset()
            self._send(_json_answer(200, {"reset": True}))
        elif path == "/_sim/config":
            self._send(self._configure(raw))
        else:
            self._not_found()

    def _configure(self, raw: bytes | None) -> Answer:
        upstream = self.server.upstream
        try:
            changes = json.loads(raw or b"")
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object of settings")
            upstream.configure(upstream.config.patched(changes))
        except (ValueError, TypeError) as error:
            return anthropic_error(400, "invalid_request_error", str(error), "req_sim")
        return _json_answer(200, upstream.config.public())

    def _not_found(self) -> None:
        message = "The requested resource could not be found."
        self._send(anthropic_error(404, "not_found_error", message, "req_" + secrets.token_hex(12)))

    def _read_body(self) -> bytes | None:
        """The body, or None when it is too large (then the connection is closed after)."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes | None:
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if chunk == 0:
                while self.rfile.readline().strip():  # trailers
                    pass
                return b"".join(parts)
            size += chunk
            if size > MAX_BODY_BYTES:
                self.close_connection = True
                return None
            parts.append(self.rfile.read(chunk))
            self.rfile.readline()

    def _send(self, answer: Answer) -> None:
        try:
            if answer.drop:
                log.debug("simulator %s dropped the connection", self.client_address[0])
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(answer.status, _REASONS.get(answer.status))
            if answer.content_type:
                self.send_header("content-type", answer.content_type)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
        except OSError:
            # The client went away (its timeout, most often): nothing left to tell it.
            self.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Benchmarks hold 100+ calls open at once; the default backlog of 5 would refuse some.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], upstream: Upstream) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.upstream = upstream
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can hang without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its client
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("simulator: error while serving %s", client_address, exc_info=True)


# ---------------------------------------------------------------------------------------------
# Python API


class Simulator:
    """The simulator on a port of its own; binds at once, so `url` is known before `start()`."""

    def __init__(
        self, config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.upstream = Upstream(config or SimulatorConfig())
        self._server = _HTTPServer((host, port), self.upstream)
        self._thread: threading.Thread | None = None

    @property
    def config(self) -> SimulatorConfig:
        return self.upstream.config

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"http://[{name}]:{port}" if ":" in name else f"http://{name}:{port}"

    def start(self) -> Simulator:
        if self._thread is None:
            # A short poll makes stop() quick, which tests that start many simulators feel.
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="promptq-simulator",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
        self._server.close_connections()

    def stats(self) -> dict[str, Any]:
        return self.upstream.stats.snapshot()

    def reset(self) -> None:
        self.upstream.reset()

    def configure(self, **changes: Any) -> SimulatorConfig:
        self.upstream.configure(self.upstream.config.patched(changes))
        return self.upstream.config

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(host: str, port: int, config: SimulatorConfig) -> None:
    """Serve in the foreground until KeyboardInterrupt."""
    simulator = Simulator(config, host, port)
    log.info("promptq upstream simulator listening on %s", simulator.url)
    try:
        simulator._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        simulator._server.server_close()
        simulator._server.close_connections()
