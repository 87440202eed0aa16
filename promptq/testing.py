"""What the test suites (tests/unit, tests/stack) and the benchmarks (bench/) share: one
place for the constants they would otherwise each write down again. promptq itself never
imports this module."""

from __future__ import annotations

# The statuses a job ends in, as the API spells them. Written out rather than taken from
# promptq.models.FINAL_STATUSES, so that a change to the code's idea of "final" shows up
# in the tests instead of moving with them.
FINAL = frozenset({"succeeded", "failed", "canceled"})

# Rate limits far above what any test or benchmark sends (the largest the limit table
# accepts), so that the limiter does all its bookkeeping, as in production, but never makes
# a job wait: only the tests of the limits themselves, which set their own, ever wait for
# budget, and the benchmarks measure promptq rather than the built-in limits (CometAPI's
# defaults: 50 requests a minute, 20 in flight).
GENEROUS_LIMITS = "".join(
    f"""
[models."{pattern}"]
rpm = 1000000
input_tpm = 100000000
output_tpm = 100000000
max_concurrency = 10000
"""
    for pattern in ("*", "claude-*")
)

# Models with built-in prices, by the names the tests give them.
SONNET = "claude-sonnet-4-5-20250929"
HAIKU = "claude-haiku-4-5-20251001"
