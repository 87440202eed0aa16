"""A limits file from what the upstream reports of the account's limits.

Anthropic (and gateways that pass its headers on) answer every call with
`anthropic-ratelimit-{requests,input-tokens,output-tokens}-limit`: the account's own limits
for the model called. One minimal call is enough to write them down.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from promptq.ratelimit.headers import ReportedLimits

# The cheapest call that still reports the model's limits: one token in, one token out.
MINIMAL_CALL_TEXT = "Hi"


def minimal_request(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 1,
        "messages": [{"role": "user", "content": MINIMAL_CALL_TEXT}],
    }


def limits_file_text(
    model: str, reported: ReportedLimits, upstream_url: str, now: datetime | None = None
) -> str | None:
    """A limits file for `model` from what the upstream reported, or None if it reported no
    limit at all. What it does not report is left out, so it is inherited (see table.py)."""
    fields = {
        "rpm": reported.requests,
        "input_tpm": reported.input_tokens,
        "output_tpm": reported.output_tokens,
    }
    given = {name: value for name, value in fields.items() if value}
    if not given:
        return None
    day = (now or datetime.now(UTC)).date().isoformat()
    lines = [
        f"# The limits {upstream_url} reported for {model} on {day}.",
        "# Point PROMPTQ_LIMITS_FILE at this file. The upstream applies one set of limits to a",
        "# model family (Anthropic: all Claude Sonnet 4.x share one): widen the pattern, e.g.",
        '# "claude-sonnet-4*", so that every model of the family shares the bucket.',
        f'[models."{model}"]',
        *(f"{name} = {value}" for name, value in given.items()),
    ]
    return "\n".join(lines) + "\n"
