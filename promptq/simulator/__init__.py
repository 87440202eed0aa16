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

from promptq.simulator.answers import Answer, ApiError, anthropic_error, openai_error
from promptq.simulator.config import CHARS_PER_TOKEN, MAX_BODY_BYTES, SimulatorConfig
from promptq.simulator.directives import Directives, parse_directives
from promptq.simulator.faults import FAULTS, fault_answer
from promptq.simulator.model import (
    CacheUsage,
    PromptCache,
    Segment,
    build_message,
    canonical,
    last_user_text,
    prompt_segments,
    tokens,
)
from promptq.simulator.ratelimit import Admission, RateLimiter, TokenBucket
from promptq.simulator.server import Simulator, serve
from promptq.simulator.stats import Stats
from promptq.simulator.upstream import Upstream
from promptq.simulator.validation import validate_request

__all__ = [
    "CHARS_PER_TOKEN",
    "FAULTS",
    "MAX_BODY_BYTES",
    "Admission",
    "Answer",
    "ApiError",
    "CacheUsage",
    "Directives",
    "PromptCache",
    "RateLimiter",
    "Segment",
    "Simulator",
    "SimulatorConfig",
    "Stats",
    "TokenBucket",
    "Upstream",
    "anthropic_error",
    "build_message",
    "canonical",
    "fault_answer",
    "last_user_text",
    "openai_error",
    "parse_directives",
    "prompt_segments",
    "serve",
    "tokens",
    "validate_request",
]
