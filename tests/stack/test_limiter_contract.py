"""The Limiter protocol's promises, kept by both limiters: the Redis one a deployment runs
(against the real Redis) and the in-memory one the unit room runs jobs with. The same
scenario, two implementations: the unit tests' stand-in cannot drift from what it stands in
for without one of these failing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from promptq.ratelimit.limiter import RedisLimiter
from promptq.ratelimit.memory import MemoryLimiter
from promptq.ratelimit.protocol import Limiter
from promptq.ratelimit.table import LimitTable, ModelLimits
from promptq.usage import Usage

MODEL = "claude-contract-1"
MakeLimiter = Callable[..., Limiter]


@pytest.fixture(params=["redis", "memory"])
def make_limiter(request: pytest.FixtureRequest) -> Iterator[MakeLimiter]:
    client: redis.Redis | None = None
    if request.param == "redis":
        # The limiter tests' database (tests/stack/test_ratelimit_limiter.py uses it too).
        url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/2"
        client = redis.Redis.from_url(url)
        client.flushdb()

    def make(
        rpm: int | None = None,
        output_tpm: int | None = None,
        max_concurrency: int | None = None,
        burst_seconds: float = 0.5,
    ) -> Limiter:
        limits = ModelLimits(
            "*", rpm, None, output_tpm, max_concurrency, burst_seconds=burst_seconds
        )
        table = LimitTable([limits])
        if client is None:
            return MemoryLimiter(table)
        return RedisLimiter(client, table)

    yield make
    if client is not None:
        client.flushdb()


def request(max_tokens: int = 10) -> dict[str, Any]:
    message = {"role": "user", "content": "hello"}
    return {"model": MODEL, "max_tokens": max_tokens, "messages": [message]}


def test_past_max_concurrency_jobs_queue_and_the_head_goes_when_a_slot_frees(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter(max_concurrency=1)
    first = limiter.acquire("job-1", MODEL, request(), "normal")
    second = limiter.acquire("job-2", MODEL, request(), "normal")

    assert first.grant is not None
    assert second.grant is None and second.waiting_for == "concurrency"
    assert limiter.queued([("job-1", MODEL), ("job-2", MODEL)]) == {"job-2"}
    assert limiter.waiting_models() == [MODEL]
    assert limiter.dispatch(MODEL).job_id is None

    limiter.settle(first.grant, Usage(input_tokens=1, output_tokens=1))
    offer = limiter.dispatch(MODEL)
    assert (offer.job_id, offer.priority) == ("job-2", "normal") and offer.grant is not None
    assert limiter.dispatch(MODEL).empty


def test_a_newcomer_waits_behind_the_queue_and_a_redelivery_keeps_its_place(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter(max_concurrency=1)
    held = limiter.acquire("job-1", MODEL, request(), "normal").grant
    assert held is not None
    limiter.acquire("job-2", MODEL, request(), "normal")
    limiter.settle(held, None, called=False)

    late = limiter.acquire("job-3", MODEL, request(), "normal")
    again = limiter.acquire("job-2", MODEL, request(), "normal")

    assert late.grant is None and late.waiting_for == "queue"
    assert again.grant is None
    assert limiter.dispatch(MODEL).job_id == "job-2"


def test_the_queue_goes_by_priority_then_arrival(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(max_concurrency=1)
    grant = limiter.acquire("running", MODEL, request(), "normal").grant
    for job, priority in [("low", "low"), ("normal", "normal"), ("high-1", "high")]:
        limiter.acquire(job, MODEL, request(), priority)
    limiter.acquire("high-2", MODEL, request(), "high")

    order = []
    while grant is not None:
        limiter.settle(grant, None, called=False)
        offer = limiter.dispatch(MODEL)
        order.append(offer.job_id)
        grant = offer.grant
    assert order == ["high-1", "high-2", "normal", "low", None]


def test_a_grant_never_used_gives_its_request_back(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(rpm=1, burst_seconds=1)
    grant = limiter.acquire("job-1", MODEL, request(), "normal").grant
    assert grant is not None
    waiting = limiter.acquire("job-2", MODEL, request(), "normal")
    assert waiting.waiting_for == "rpm" and waiting.wait_seconds == pytest.approx(60, abs=0.5)

    limiter.settle(grant, None, called=False)

    assert limiter.dispatch(MODEL).job_id == "job-2"


def test_unwritten_output_tokens_come_back_when_the_call_is_settled(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter(output_tpm=600)
    big = limiter.acquire("job-1", MODEL, request(max_tokens=500), "normal").grant
    assert big is not None
    assert limiter.acquire("job-2", MODEL, request(max_tokens=100), "normal").waiting_for == (
        "output_tpm"
    )

    limiter.settle(big, Usage(input_tokens=1, output_tokens=10))

    assert limiter.dispatch(MODEL).job_id == "job-2"


def test_a_renewed_grant_holds_one_slot_until_it_is_settled(make_limiter: MakeLimiter) -> None:
    """What the lease keeper does while a call runs: renewing with the grant's job id (whose
    stand-in slot, after a rebuild, the grant's own replaces) never counts the call twice
    nor frees its slot."""
    limiter = make_limiter(max_concurrency=1)
    grant = limiter.acquire("job-1", MODEL, request(), "normal").grant
    assert grant is not None

    limiter.renew([grant], ["job-1"])

    assert limiter.acquire("job-2", MODEL, request(), "normal").waiting_for == "concurrency"
    limiter.settle(grant, Usage(input_tokens=1, output_tokens=1))
    assert limiter.dispatch(MODEL).job_id == "job-2"


def test_a_429_pauses_the_model_for_its_retry_after(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    limiter.feedback(MODEL, {}, throttled=True, retry_after=5.0)

    paused = limiter.acquire("job-1", MODEL, request(), "normal")

    assert paused.waiting_for == "upstream_backoff"
    assert paused.wait_seconds == pytest.approx(5.0, abs=0.5)


def test_a_keys_rpm_spreads_its_jobs_start_times(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    delays = [limiter.reserve_for_key("key-a", 6) for _ in range(3)]
    assert delays == pytest.approx([0, 10, 20], abs=0.5)
    assert limiter.reserve_for_key("key-b", 6) == pytest.approx(0, abs=0.01)
