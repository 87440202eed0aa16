"""The in-memory limiter keeps the Limiter protocol's promises, on a clock moved by hand:
what the unit room's runner tests lean on. (tests/stack/test_limiter_contract.py holds it
to the Redis limiter's behaviour on the same scenarios.)"""

from __future__ import annotations

import pytest
from doubles import ManualClock

from promptq.ratelimit.memory import MemoryLimiter
from promptq.ratelimit.table import LimitTable, ModelLimits
from promptq.usage import Usage

MODEL = "claude-unit-1"


def request(max_tokens: int = 10) -> dict[str, object]:
    message = {"role": "user", "content": "hi"}
    return {"model": MODEL, "max_tokens": max_tokens, "messages": [message]}


def make(
    clock: ManualClock,
    lease: float = 30.0,
    rpm: int | None = None,
    output_tpm: int | None = None,
    max_concurrency: int | None = None,
    burst_seconds: float = 0.5,
) -> MemoryLimiter:
    """Only the limits given; the rest unlimited."""
    limits = ModelLimits("*", rpm, None, output_tpm, max_concurrency, burst_seconds=burst_seconds)
    return MemoryLimiter(LimitTable([limits]), slot_lease_seconds=lease, clock=clock)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def test_calls_past_max_concurrency_queue_and_go_as_slots_free(clock: ManualClock) -> None:
    limiter = make(clock, max_concurrency=2)
    first = limiter.acquire("job-1", MODEL, request(), "normal")
    second = limiter.acquire("job-2", MODEL, request(), "normal")
    third = limiter.acquire("job-3", MODEL, request(), "normal")

    assert first.grant is not None and second.grant is not None
    assert third.grant is None and third.waiting_for == "concurrency"
    assert limiter.in_flight(MODEL) == 2 and limiter.waiting(MODEL) == ["job-3"]
    assert limiter.waiting_models() == [MODEL]
    assert limiter.dispatch(MODEL).job_id is None

    limiter.settle(first.grant, Usage(input_tokens=2, output_tokens=3))
    offer = limiter.dispatch(MODEL)
    assert offer.job_id == "job-3" and offer.priority == "normal" and offer.grant is not None
    assert limiter.dispatch(MODEL).empty
    assert limiter.waiting_models() == []


def test_a_newcomer_queues_behind_jobs_already_waiting(clock: ManualClock) -> None:
    limiter = make(clock, max_concurrency=1)
    held = limiter.acquire("job-1", MODEL, request(), "normal").grant
    assert held is not None
    assert limiter.acquire("job-2", MODEL, request(), "normal").waiting_for == "concurrency"
    limiter.settle(held, None, called=False)

    # Budget is free now, but job-2 was first.
    late = limiter.acquire("job-3", MODEL, request(), "normal")
    assert late.grant is None and late.waiting_for == "queue"
    assert limiter.waiting(MODEL) == ["job-2", "job-3"]
    # A redelivered message keeps its place rather than joining again.
    assert limiter.acquire("job-2", MODEL, request(), "normal").grant is None
    assert limiter.waiting(MODEL) == ["job-2", "job-3"]
    assert limiter.queued([("job-3", MODEL), ("job-1", MODEL), ("job-2", "other")]) == {"job-3"}


def test_waiting_jobs_go_by_priority_then_arrival(clock: ManualClock) -> None:
    limiter = make(clock, max_concurrency=1)
    held = limiter.acquire("running", MODEL, request(), "normal").grant
    assert held is not None
    for job, priority in [("low-1", "low"), ("normal-1", "normal"), ("high-1", "high")]:
        limiter.acquire(job, MODEL, request(), priority)
    limiter.acquire("high-2", MODEL, request(), "high")

    assert limiter.waiting(MODEL) == ["high-1", "high-2", "normal-1", "low-1"]
    limiter.settle(held, None, called=False)
    offer = limiter.dispatch(MODEL)
    assert (offer.job_id, offer.priority) == ("high-1", "high")
    assert limiter.waiting(MODEL) == ["high-2", "normal-1", "low-1"]


def test_requests_are_spread_at_the_rpm_after_a_small_burst(clock: ManualClock) -> None:
    limiter = make(clock, rpm=60, burst_seconds=2)  # one a second, two at once
    granted = [limiter.acquire(f"job-{i}", MODEL, request(), "normal").grant for i in range(3)]
    assert [g is not None for g in granted] == [True, True, False]
    assert limiter.dispatch(MODEL).wait_seconds == pytest.approx(1.0)

    clock.advance(0.99)
    assert limiter.dispatch(MODEL).job_id is None
    clock.advance(0.02)
    assert limiter.dispatch(MODEL).job_id == "job-2"


def test_output_tokens_are_reserved_at_max_tokens_and_refunded_by_usage(
    clock: ManualClock,
) -> None:
    # 600 output tokens a minute, a meter as deep as a minute (less the 2% margin).
    limiter = make(clock, output_tpm=600)
    big = limiter.acquire("job-1", MODEL, request(max_tokens=500), "normal").grant
    assert big is not None
    blocked = limiter.acquire("job-2", MODEL, request(max_tokens=100), "normal")
    assert blocked.waiting_for == "output_tpm"

    # The call wrote 10 tokens: the other 490 come back, and the next call fits.
    limiter.settle(big, Usage(input_tokens=1, output_tokens=10))
    assert limiter.dispatch(MODEL).job_id == "job-2"


def test_a_grant_never_used_gives_everything_back(clock: ManualClock) -> None:
    limiter = make(clock, rpm=1, burst_seconds=1)
    grant = limiter.acquire("job-1", MODEL, request(), "normal").grant
    assert grant is not None
    assert limiter.acquire("job-2", MODEL, request(), "normal").waiting_for == "rpm"

    limiter.settle(grant, None, called=False)
    assert limiter.dispatch(MODEL).job_id == "job-2"


def test_a_429_pauses_the_model_for_its_retry_after(clock: ManualClock) -> None:
    limiter = make(clock)
    limiter.feedback(MODEL, {}, throttled=True, retry_after=5.0)

    paused = limiter.acquire("job-1", MODEL, request(), "normal")
    assert paused.waiting_for == "upstream_backoff"
    assert paused.wait_seconds == pytest.approx(5.0)
    clock.advance(5.01)
    assert limiter.dispatch(MODEL).job_id == "job-1"
    # Headers alone (no 429) pause nothing.
    limiter.feedback(MODEL, {"anthropic-ratelimit-requests-limit": "50"}, False, None)
    assert limiter.acquire("job-2", MODEL, request(), "normal").grant is not None


def test_a_slot_lapses_unless_renewed(clock: ManualClock) -> None:
    limiter = make(clock, lease=10, max_concurrency=2)
    kept = limiter.acquire("job-1", MODEL, request(), "normal").grant
    lost = limiter.acquire("job-2", MODEL, request(), "normal").grant
    assert kept is not None and lost is not None

    clock.advance(8)
    limiter.renew([kept])
    clock.advance(8)  # 16 s: the renewed slot holds until 18, the other lapsed at 10

    assert limiter.in_flight(MODEL) == 1
    assert limiter.acquire("job-3", MODEL, request(), "normal").grant is not None
    assert limiter.acquire("job-4", MODEL, request(), "normal").grant is None


def test_a_keys_rpm_spreads_its_jobs_start_times(clock: ManualClock) -> None:
    limiter = make(clock)
    delays = [limiter.reserve_for_key("key-a", rpm=6) for _ in range(3)]
    assert delays == pytest.approx([0, 10, 20])
    # Another key has a rate of its own.
    assert limiter.reserve_for_key("key-b", rpm=6) == 0
    clock.advance(30)
    assert limiter.reserve_for_key("key-a", rpm=6) == 0
