"""The limiter's decisions, against the real Redis: pacing, tokens, slots, pauses,
adaptation, reported limits, priorities and key reservations."""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from promptq.ratelimit.limiter import Adaptive, RedisLimiter
from promptq.ratelimit.protocol import Grant
from promptq.ratelimit.table import LimitTable
from promptq.usage import Usage

MODEL = "claude-test-1"

MakeLimiter = Callable[..., RedisLimiter]


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    # A database of its own, so no worker of another test module sees these buckets.
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/2")
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def make_limiter(redis_client: redis.Redis) -> MakeLimiter:
    def make(
        slot_lease_seconds: float = 30.0, adaptive: Adaptive | None = None, **limits: Any
    ) -> RedisLimiter:
        fields = {
            "rpm": "unlimited",
            "input_tpm": "unlimited",
            "output_tpm": "unlimited",
            "max_concurrency": "unlimited",
            **limits,
        }
        body = "\n".join(f"{name} = {json.dumps(value)}" for name, value in fields.items())
        table = LimitTable.from_toml(f'[models."claude-test-*"]\n{body}\n')
        return RedisLimiter(
            redis_client, table, slot_lease_seconds=slot_lease_seconds, adaptive=adaptive
        )

    return make


def request(max_tokens: int = 10, text: str = "hello") -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    }


def drain(limiter: RedisLimiter, seconds: float) -> list[tuple[float, Grant]]:
    """Run a dispatcher loop for a while; the (monotonic time, grant) of every grant."""
    granted: list[tuple[float, Grant]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        offer = limiter.dispatch(MODEL)
        if offer.grant is not None:
            granted.append((time.monotonic(), offer.grant))
            continue
        if offer.empty:
            break
        time.sleep(min(offer.wait_seconds, 0.01))
    return granted


def test_first_call_is_granted_then_others_queue(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(rpm=60, burst_seconds=0.5)
    first = limiter.acquire("job-1", MODEL, request(), "normal")
    assert first.grant is not None
    second = limiter.acquire("job-2", MODEL, request(), "normal")
    assert second.grant is None and second.waiting_for == "rpm"
    assert 0.4 < second.wait_seconds <= 1.0
    third = limiter.acquire("job-3", MODEL, request(), "normal")
    assert third.grant is None and third.waiting_for == "queue"  # behind job-2
    assert limiter.snapshot(MODEL)["waiting"] == 2


def test_calls_are_spread_evenly_with_a_small_burst(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(rpm=1200, burst_seconds=0.25)  # 20 a second, 5 at once
    for i in range(200):
        limiter.acquire(f"job-{i}", MODEL, request(), "normal")
    granted = drain(limiter, 2.0)
    times = [t for t, _ in granted]
    # Two seconds at 20/s plus the burst of 5 (and the one granted on arrival).
    assert 40 <= len(granted) + 1 <= 47
    for start in times:
        in_window = sum(1 for t in times if start <= t < start + 1.0)
        assert in_window <= 20 + 5 + 1
    # Past the burst, one every 50 ms. Not the smallest gap: a stall of this process (a busy
    # CI machine) lets budget build up to the burst, which is then rightly granted at once.
    gaps = [b - a for a, b in itertools.pairwise(times[6:])]
    assert 0.04 <= statistics.median(gaps) <= 0.06


def test_output_tokens_are_reserved_then_refunded(make_limiter: MakeLimiter) -> None:
    # 100 tokens a second, a meter half a second deep.
    limiter = make_limiter(output_tpm=6000, token_burst_seconds=0.5)
    first = limiter.acquire("job-1", MODEL, request(max_tokens=100), "normal").grant
    assert first is not None and first.output_tokens == 100
    blocked = limiter.acquire("job-2", MODEL, request(max_tokens=100), "normal")
    assert blocked.waiting_for == "output_tpm" and blocked.wait_seconds > 0.3
    assert limiter.dispatch(MODEL).grant is None
    # The call used 5 of its 100 tokens: the other 95 come back at once, so the next call
    # waits 50 ms for those 5 instead of most of a second.
    limiter.settle(first, Usage(input_tokens=2, output_tokens=5))
    assert limiter.dispatch(MODEL).wait_seconds < 0.06
    [(_, grant)] = drain(limiter, 0.2)
    assert grant.output_tokens == 100


def test_input_estimate_is_corrected_by_usage(make_limiter: MakeLimiter) -> None:
    # 1,000 tokens a second.
    limiter = make_limiter(input_tpm=60_000, token_burst_seconds=0.1)
    grant = limiter.acquire("job-1", MODEL, request(text="x" * 350), "normal").grant
    assert grant is not None and 90 <= grant.input_tokens <= 120  # a conservative guess
    before = limiter.snapshot(MODEL)["ahead_seconds"]["inp"]
    # The call really read 1,000 tokens: the bucket is charged the difference.
    limiter.settle(grant, Usage(input_tokens=1000, output_tokens=1))
    after = limiter.snapshot(MODEL)["ahead_seconds"]["inp"]
    assert after - before == pytest.approx(0.9, abs=0.1)


def test_unused_grant_gives_everything_back(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(rpm=60, max_concurrency=1, burst_seconds=0.5)
    grant = limiter.acquire("job-1", MODEL, request(), "normal").grant
    assert grant is not None
    assert limiter.acquire("job-2", MODEL, request(), "normal").grant is None
    limiter.settle(grant, None, called=False)  # e.g. the job was canceled meanwhile
    assert limiter.dispatch(MODEL).job_id == "job-2"


def test_a_dead_callers_slot_frees_itself(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(max_concurrency=2, slot_lease_seconds=1.0)
    assert limiter.acquire("job-1", MODEL, request(), "normal").grant is not None
    assert limiter.acquire("job-2", MODEL, request(), "normal").grant is not None
    third = limiter.acquire("job-3", MODEL, request(), "normal")
    assert third.waiting_for == "concurrency"
    # Nobody settles or renews jobs 1 and 2, as if their worker was killed.
    assert limiter.dispatch(MODEL).grant is None
    time.sleep(1.1)
    assert limiter.dispatch(MODEL).job_id == "job-3"


def test_renewed_slots_stay_held(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(max_concurrency=1, slot_lease_seconds=1.0)
    grant = limiter.acquire("job-1", MODEL, request(), "normal").grant
    assert grant is not None
    limiter.acquire("job-2", MODEL, request(), "normal")
    for _ in range(3):
        time.sleep(0.5)
        limiter.renew([grant])
        assert limiter.dispatch(MODEL).grant is None
    limiter.settle(grant, Usage(output_tokens=1))
    assert limiter.dispatch(MODEL).job_id == "job-2"


def test_a_slot_redis_lost_comes_back_at_the_next_renewal(
    make_limiter: MakeLimiter, redis_client: redis.Redis
) -> None:
    """A failover to a replica that had not yet seen the grant loses its slot; the worker
    holding the call puts it back."""
    limiter = make_limiter(max_concurrency=1)
    grant = limiter.acquire("job-1", MODEL, request(), "normal").grant
    assert grant is not None
    redis_client.zrem(RedisLimiter.keys(MODEL)[1], grant.id)
    assert limiter.snapshot(MODEL)["in_flight"] == 0
    limiter.renew([grant])
    assert limiter.snapshot(MODEL)["in_flight"] == 1
    assert limiter.acquire("job-2", MODEL, request(), "normal").waiting_for == "concurrency"


def test_after_a_wipe_the_slots_come_back_from_the_running_jobs(
    make_limiter: MakeLimiter, redis_client: redis.Redis
) -> None:
    """Redis restarted empty with two calls in flight: nothing is granted past the limit
    before the slots are rebuilt from the database's running jobs, and the workers'
    renewals then swap each stand-in for the grant's own slot, never counting one twice."""
    limiter = make_limiter(max_concurrency=3, slot_lease_seconds=30.0)
    grants = {
        job: limiter.acquire(job, MODEL, request(), "normal").grant for job in ("job-1", "job-2")
    }
    redis_client.flushdb()
    asked: list[str] = []

    def running_calls(model: str) -> list[tuple[str, float]]:
        asked.append(model)
        return [("job-1", 20.0), ("job-2", 20.0)]

    limiter.running_calls = running_calls
    assert limiter.acquire("job-3", MODEL, request(), "normal").grant is not None
    assert limiter.acquire("job-4", MODEL, request(), "normal").waiting_for == "concurrency"
    assert asked == [MODEL]  # once, not at every call
    assert limiter.snapshot(MODEL)["in_flight"] == 3
    held = [g for g in grants.values() if g is not None]
    limiter.renew(held, ["job-1", "job-2"])
    assert limiter.snapshot(MODEL)["in_flight"] == 3
    limiter.settle(held[0], Usage(output_tokens=1))
    assert limiter.dispatch(MODEL).job_id == "job-4"


def test_a_model_without_a_concurrency_limit_needs_no_rebuild(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter(rpm=600)
    limiter.running_calls = lambda model: pytest.fail("no slots to rebuild")
    assert limiter.acquire("job-1", MODEL, request(), "normal").grant is not None


def test_a_429_pauses_the_model_for_everyone(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(rpm=6000)
    other = make_limiter(rpm=6000)  # another worker process: same Redis, same model
    limiter.feedback(MODEL, {}, throttled=True, retry_after=1.0)
    paused = other.acquire("job-1", MODEL, request(), "normal")
    assert paused.waiting_for == "upstream_backoff"
    assert 0.8 < paused.wait_seconds <= 1.0
    assert other.acquire("elsewhere", "claude-test-other", request(), "normal").grant
    time.sleep(1.05)
    assert other.dispatch(MODEL).job_id == "job-1"


def test_429s_cut_the_rate_which_then_settles_below_the_refused_rate(
    make_limiter: MakeLimiter,
) -> None:
    adaptive = Adaptive(cut=0.5, debounce_seconds=0.5, recovery_seconds=2.0)
    limiter = make_limiter(rpm=6000, adaptive=adaptive)
    limiter.feedback(MODEL, {}, throttled=True, retry_after=0.0)
    limiter.feedback(MODEL, {}, throttled=True, retry_after=0.0)  # same burst: cut once
    assert limiter.snapshot(MODEL)["factor"] == pytest.approx(0.5, abs=0.02)
    time.sleep(0.6)
    # Climbing back towards 95% of the refused share (1.0) over 2 s, when refused again.
    refused = 0.5 + (0.95 - 0.5) * 0.6 / 2
    limiter.feedback(MODEL, {}, throttled=True, retry_after=0.0)
    assert limiter.snapshot(MODEL)["factor"] == pytest.approx(refused * 0.5, abs=0.03)
    time.sleep(2.2)
    # Back, but only to just under the share the upstream refused, not to the full rate.
    assert limiter.snapshot(MODEL)["factor"] == pytest.approx(0.95 * refused, abs=0.03)


def test_reported_limits_cap_the_configured_ones(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(rpm=6000, burst_seconds=0.1)  # configured 100/s
    limiter.feedback(
        MODEL, {"anthropic-ratelimit-requests-limit": "60"}, throttled=False, retry_after=None
    )
    assert limiter.snapshot(MODEL)["reported"] == {"req": 60}
    assert limiter.acquire("job-1", MODEL, request(), "normal").grant is not None
    second = limiter.acquire("job-2", MODEL, request(), "normal")
    assert second.waiting_for == "rpm" and second.wait_seconds > 0.8  # 1/s, not 100/s


def test_reported_exhaustion_of_requests_pauses_until_reset(make_limiter: MakeLimiter) -> None:
    from datetime import UTC, datetime, timedelta

    limiter = make_limiter(rpm=6000)
    reset = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    limiter.feedback(
        MODEL,
        {
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": reset,
        },
        throttled=False,
        retry_after=None,
    )
    decision = limiter.acquire("job-1", MODEL, request(), "normal")
    assert decision.waiting_for == "upstream_backoff" and 1.5 < decision.wait_seconds <= 2.0


def test_reported_exhaustion_of_tokens_empties_the_meter_instead_of_pausing(
    make_limiter: MakeLimiter,
) -> None:
    from datetime import UTC, datetime, timedelta

    # A token "reset" is when the bucket is full again (here 30 s away), but it refills all
    # along: a call needing 100 tokens at 100 a second can go in about a second.
    limiter = make_limiter(output_tpm=6000)
    reset = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
    limiter.feedback(
        MODEL,
        {
            "anthropic-ratelimit-output-tokens-limit": "6000",
            "anthropic-ratelimit-output-tokens-remaining": "0",
            "anthropic-ratelimit-output-tokens-reset": reset,
        },
        throttled=False,
        retry_after=None,
    )
    decision = limiter.acquire("job-1", MODEL, request(max_tokens=100), "normal")
    assert decision.waiting_for == "output_tpm" and 0.8 < decision.wait_seconds <= 1.0


def test_reported_remaining_tokens_lower_the_meter_but_never_raise_it(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter(output_tpm=6000)  # 100 a second, a meter of 6,000
    headers = {"anthropic-ratelimit-output-tokens-remaining": "500"}
    limiter.feedback(MODEL, headers, throttled=False, retry_after=None)
    # Someone else spent the account's tokens: 500 left, so 1,000 wait for 500 more.
    decision = limiter.acquire("job-1", MODEL, request(max_tokens=1000), "normal")
    assert decision.waiting_for == "output_tpm" and 4.5 < decision.wait_seconds <= 5.0
    # A higher figure later does not give back what the meter knows to be spent.
    limiter.feedback(
        MODEL,
        {"anthropic-ratelimit-output-tokens-remaining": "6000"},
        throttled=False,
        retry_after=None,
    )
    assert limiter.dispatch(MODEL).wait_seconds > 4.0


def test_calls_larger_than_the_request_burst_run_concurrently_up_to_the_token_capacity(
    make_limiter: MakeLimiter,
) -> None:
    # Anthropic's first tier: 8,000 output tokens a minute. With max_tokens 1,024 the account
    # holds seven such calls at once; a meter of half a second would hold one.
    limiter = make_limiter(rpm=60_000, output_tpm=8000)
    grants = [
        limiter.acquire(f"job-{i}", MODEL, request(max_tokens=1024), "normal").grant
        for i in range(7)
    ]
    assert all(grant is not None for grant in grants)
    eighth = limiter.acquire("job-8", MODEL, request(max_tokens=1024), "normal")
    assert eighth.grant is None and eighth.waiting_for == "output_tpm"
    # A call that wrote 100 of its 1,024 gives the rest back: the eighth fits at once.
    first = grants[0]
    assert first is not None
    limiter.settle(first, Usage(input_tokens=5, output_tokens=100))
    assert limiter.dispatch(MODEL).job_id == "job-8"


def cached_request(text: str = "hello", ttl: str | None = None) -> dict[str, Any]:
    control: dict[str, str] = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return {
        **request(text=text),
        # About 1,000 tokens of instructions, marked for the prompt cache.
        "system": [{"type": "text", "text": "rules " * 583, "cache_control": control}],
    }


def input_tat(client: redis.Redis) -> float:
    return float(client.hget(RedisLimiter.keys(MODEL)[0], "tat:inp") or 0)


def test_cache_reads_leave_the_input_meter_untouched(
    make_limiter: MakeLimiter, redis_client: redis.Redis
) -> None:
    limiter = make_limiter(input_tpm=60_000)  # 1,000 tokens a second: 1 ms a token
    # The first call writes the cache: the whole prompt counts.
    first = limiter.acquire("job-1", MODEL, cached_request("one"), "normal").grant
    assert first is not None and first.input_tokens > 1000
    written = Usage(input_tokens=5, output_tokens=3, cache_creation_input_tokens=1000)
    limiter.settle(first, written, request=cached_request("one"))
    # The next one reads it: only what follows the cached prefix is charged...
    before = input_tat(redis_client)
    second = limiter.acquire("job-2", MODEL, cached_request("two"), "normal").grant
    assert second is not None and second.input_tokens < 20
    assert input_tat(redis_client) - before < 20
    # ...and settled to what the upstream counted: the cache read adds nothing.
    read = Usage(input_tokens=5, output_tokens=3, cache_read_input_tokens=1000)
    limiter.settle(second, read, request=cached_request("two"))
    assert input_tat(redis_client) - before == pytest.approx(5, abs=0.01)


def test_an_upstream_that_counts_cache_reads_is_charged_for_them(
    make_limiter: MakeLimiter, redis_client: redis.Redis
) -> None:
    limiter = make_limiter(input_tpm=60_000, count_cache_reads=True)
    first = limiter.acquire("job-1", MODEL, cached_request("one"), "normal").grant
    assert first is not None
    written = Usage(input_tokens=5, output_tokens=3, cache_creation_input_tokens=1000)
    limiter.settle(first, written, request=cached_request("one"))
    before = input_tat(redis_client)
    second = limiter.acquire("job-2", MODEL, cached_request("two"), "normal").grant
    assert second is not None and second.input_tokens > 1000
    read = Usage(input_tokens=5, output_tokens=3, cache_read_input_tokens=1000)
    limiter.settle(second, read, request=cached_request("two"))
    assert input_tat(redis_client) - before == pytest.approx(1005, abs=0.01)


def test_a_prompt_the_upstream_did_not_cache_is_charged_whole(
    make_limiter: MakeLimiter, redis_client: redis.Redis
) -> None:
    # Too short to cache, say: the answer reports no cache write, so nothing is remembered.
    limiter = make_limiter(input_tpm=60_000)
    first = limiter.acquire("job-1", MODEL, cached_request("one"), "normal").grant
    assert first is not None
    limiter.settle(first, Usage(input_tokens=1005, output_tokens=3), request=cached_request())
    second = limiter.acquire("job-2", MODEL, cached_request("two"), "normal").grant
    assert second is not None and second.input_tokens > 1000


def test_a_cached_prefix_is_forgotten_when_the_upstream_cache_would_be(
    make_limiter: MakeLimiter, redis_client: redis.Redis
) -> None:
    limiter = make_limiter(input_tpm=60_000)
    for ttl, seconds in ((None, 300), ("1h", 3600)):
        grant = limiter.acquire(f"job-{ttl}", MODEL, cached_request(ttl=ttl), "normal").grant
        assert grant is not None
        written = Usage(input_tokens=5, output_tokens=3, cache_creation_input_tokens=1000)
        limiter.settle(grant, written, request=cached_request(ttl=ttl))
        [marker] = redis_client.keys(f"promptq:rl:{{{MODEL}}}:cached:*")
        assert seconds - 5 < redis_client.pttl(marker) / 1000 <= seconds
        redis_client.delete(marker)


def test_waiting_jobs_go_by_priority_then_arrival(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(max_concurrency=1)
    holder = limiter.acquire("running", MODEL, request(), "normal").grant
    assert holder is not None
    for job_id, priority in [
        ("low-1", "low"),
        ("normal-1", "normal"),
        ("low-2", "low"),
        ("high-1", "high"),
        ("normal-2", "normal"),
    ]:
        assert limiter.acquire(job_id, MODEL, request(), priority).grant is None
    order = []
    grant = holder
    for _ in range(5):
        limiter.settle(grant, Usage(output_tokens=1))
        offer = limiter.dispatch(MODEL)
        assert offer.job_id is not None and offer.grant is not None
        order.append((offer.job_id, offer.priority))
        grant = offer.grant
    assert order == [
        ("high-1", "high"),
        ("normal-1", "normal"),
        ("normal-2", "normal"),
        ("low-1", "low"),
        ("low-2", "low"),
    ]
    assert limiter.dispatch(MODEL).empty


def test_a_redelivered_job_keeps_its_place(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(max_concurrency=1)
    assert limiter.acquire("running", MODEL, request(), "normal").grant is not None
    limiter.acquire("first", MODEL, request(), "normal")
    limiter.acquire("second", MODEL, request(), "normal")
    limiter.acquire("first", MODEL, request(), "normal")  # its message came again
    assert limiter.queued([("first", MODEL), ("second", MODEL), ("third", MODEL)]) == {
        "first",
        "second",
    }
    assert limiter.snapshot(MODEL)["waiting"] == 2


def test_key_rpm_reserves_spread_out_start_times(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    delays = [limiter.reserve_for_key("key_a", rpm=60, burst_seconds=0.5) for _ in range(4)]
    assert delays == pytest.approx([0, 1, 2, 3], abs=0.05)
    bursty = [limiter.reserve_for_key("key_c", rpm=60, burst_seconds=2) for _ in range(4)]
    assert bursty == pytest.approx([0, 0, 1, 2], abs=0.05)  # two at once, then one a second
    assert limiter.reserve_for_key("key_b", rpm=60) == 0  # keys do not share


def dispatch_all(limiter: RedisLimiter, grant: Grant) -> list[tuple[str, str]]:
    """Settle `grant`, then let the queue's jobs through one at a time: their order."""
    order = []
    while True:
        limiter.settle(grant, Usage(output_tokens=1))
        offer = limiter.dispatch(MODEL)
        if offer.empty:
            return order
        assert offer.job_id is not None and offer.grant is not None and offer.priority
        order.append((offer.job_id, offer.priority))
        grant = offer.grant


def test_client_keys_take_turns_within_a_priority(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(max_concurrency=1)
    holder = limiter.acquire("running", MODEL, request(), "normal", client_key="key_a").grant
    assert holder is not None
    for i in range(20):
        limiter.acquire(f"a-{i:02}", MODEL, request(), "normal", client_key="key_a")
    for i in range(3):
        limiter.acquire(f"b-{i}", MODEL, request(), "normal", client_key="key_b")
    order = [job for job, _ in dispatch_all(limiter, holder)]
    # Key B came after key A's twenty, yet is not served after them: the keys alternate.
    assert {"b-0", "b-1", "b-2"} <= set(order[:6])
    # Each key's own jobs keep their order.
    assert [j for j in order if j.startswith("a-")] == [f"a-{i:02}" for i in range(20)]
    assert [j for j in order if j.startswith("b-")] == ["b-0", "b-1", "b-2"]


def test_one_keys_high_priority_jobs_past_its_share_wait_as_normal(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter(max_concurrency=1)
    limiter.high_waiting_per_key = 3
    holder = limiter.acquire("running", MODEL, request(), "normal", client_key="key_a").grant
    assert holder is not None
    for i in range(10):
        limiter.acquire(f"a-{i}", MODEL, request(), "high", client_key="key_a")
    for i in range(2):
        limiter.acquire(f"b-{i}", MODEL, request(), "normal", client_key="key_b")
    order = dispatch_all(limiter, holder)
    # Three of key A's "high" jobs go first; its other seven take turns with key B's.
    assert order[:3] == [("a-0", "high"), ("a-1", "high"), ("a-2", "high")]
    assert {"b-0", "b-1"} <= {job for job, _ in order[3:7]}
    assert {priority for job, priority in order[3:] if job.startswith("a-")} == {"normal"}
    # With its high jobs gone, the key has its share again.
    holder = limiter.acquire("running-2", MODEL, request(), "normal", client_key="key_c").grant
    assert holder is not None
    for i in range(2):
        limiter.acquire(f"again-{i}", MODEL, request(), "high", client_key="key_a")
    assert dispatch_all(limiter, holder) == [("again-0", "high"), ("again-1", "high")]


def test_a_keys_jobs_go_in_the_order_they_were_made_whatever_order_they_arrive(
    make_limiter: MakeLimiter,
) -> None:
    # Job ids sort by creation; the messages of three jobs reach the limiter out of order
    # (several worker threads), yet they run in the order they were made.
    limiter = make_limiter(max_concurrency=1)
    holder = limiter.acquire("job-0", MODEL, request(), "low", client_key="key_a").grant
    assert holder is not None
    for job_id in ("job-3", "job-1", "job-2"):
        limiter.acquire(job_id, MODEL, request(), "low", client_key="key_a")
    assert limiter.snapshot(MODEL)["waiting"] == 3
    assert limiter.queued([("job-1", MODEL), ("job-3", MODEL), ("job-9", MODEL)]) == {
        "job-1",
        "job-3",
    }
    assert [job for job, _ in dispatch_all(limiter, holder)] == ["job-1", "job-2", "job-3"]


def test_finish_settles_and_feeds_back_in_one_round_trip_even_after_redis_forgot_the_scripts(
    make_limiter: MakeLimiter, redis_client: redis.Redis
) -> None:
    """A call's end frees its slot and passes on a 429 together (one pipeline of the two
    scripts by digest); a Redis that lost its scripts (restarted, flushed) is given them
    again, and both still happen."""
    limiter = make_limiter(max_concurrency=1)
    grant = limiter.acquire("job-finish", MODEL, request(), "normal").grant
    assert grant is not None
    assert limiter.snapshot(MODEL)["in_flight"] == 1
    redis_client.script_flush()
    limiter.finish(grant, None, request(), {}, throttled=True, retry_after=2.0)
    snapshot = limiter.snapshot(MODEL)
    assert snapshot["in_flight"] == 0
    assert snapshot["paused_for_seconds"] > 1.0
