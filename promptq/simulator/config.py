"""Configuration: the behaviour of every call, and the limits Anthropic documents."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# Anthropic's documented size limit for a Messages request.
MAX_BODY_BYTES = 32 * 1024 * 1024

# Chars per token: the rule of thumb Anthropic documents, good enough for usage that grows.
CHARS_PER_TOKEN = 4


_PROBABILITIES = ("p_429", "p_500", "p_529", "p_malformed", "p_drop", "p_openai_error")
_SECONDS = ("latency", "latency_jitter", "burst_seconds", "token_burst_seconds")
_LIMITS = ("rpm", "input_tpm", "output_tpm")


@dataclass
class SimulatorConfig:
    latency: float = 0.0
    latency_jitter: float = 0.0
    rpm: int | None = None
    input_tpm: int | None = None
    output_tpm: int | None = None
    # Request bucket capacity in seconds of rate: 1.0 enforces a minute's limit second by
    # second.
    burst_seconds: float = 1.0
    # Token buckets are a minute deep, as Anthropic's are: continuously refilled up to the
    # per-minute maximum.
    token_burst_seconds: float = 60.0
    p_429: float = 0.0
    p_500: float = 0.0
    p_529: float = 0.0
    p_malformed: float = 0.0
    p_drop: float = 0.0
    p_openai_error: float = 0.0
    seed: int | None = None
    api_key: str | None = None
    # Send anthropic-ratelimit-* headers when limits are set (CometAPI may not pass them on;
    # switching them off tests a client that must find the limit from 429s alone).
    ratelimit_headers: bool = True
    # Serve GET /v1/models, as Anthropic does; off, it is a 404, as at a proxy without it.
    list_models: bool = True

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
        for name in ("burst_seconds", "token_burst_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
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
