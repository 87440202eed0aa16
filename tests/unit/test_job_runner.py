"""JobRunner, one delivery of a job from message to recorded attempt, with the in-memory
limiter and the simulator called in-process: every path a message can take, each seen in
the job's row, the limiter's slots and queue, and what the runner asked to publish."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from doubles import InProcessUpstream
from sqlalchemy import event

from promptq import budgets
from promptq.budgets.repository import BudgetRepository
from promptq.config import Settings
from promptq.db import get_engine, session_scope
from promptq.jobs.call_slots import CallSlots, ShuttingDown
from promptq.jobs.leases import LeaseKeeper
from promptq.jobs.runner import JobRunner
from promptq.models import ApiKey, Job, WebhookDelivery
from promptq.periods import month_key
from promptq.pricing import PriceTable, cost_of
from promptq.ratelimit.memory import MemoryLimiter
from promptq.ratelimit.protocol import Decision, RebuildNeeded
from promptq.ratelimit.table import LimitTable
from promptq.testing import GENEROUS_LIMITS, SONNET, SentMessages
from promptq.usage import Usage

MakeJob = Callable[..., str]
JobOf = Callable[[str], Job]


@dataclass
class Published:
    job_id: str
    priority: str
    countdown: float | None


@dataclass
class Harness:
    runner: JobRunner
    limiter: MemoryLimiter
    upstream: InProcessUpstream
    # What the runner's messenger sent: directly, or once a unit of work committed.
    sent: SentMessages

    @property
    def published(self) -> list[Published]:
        return [Published(*message) for message in self.sent.of_kind("publish_job")]  # type: ignore[arg-type]

    @property
    def announced(self) -> list[str]:
        return self.sent.announced


@pytest.fixture
def make_harness(
    settings: Settings, prices: PriceTable, upstream: InProcessUpstream
) -> Iterator[Callable[..., Harness]]:
    keepers: list[LeaseKeeper] = []

    def make(limiter: MemoryLimiter | None = None, **overrides: object) -> Harness:
        own = settings.model_copy(update=overrides)
        limiter = limiter or MemoryLimiter(LimitTable.from_toml(GENEROUS_LIMITS))
        leases = LeaseKeeper(own, limiter)
        keepers.append(leases)
        sent = SentMessages()
        runner = JobRunner(own, prices, upstream, limiter, leases, sent)
        return Harness(runner, limiter, upstream, sent)

    yield make
    for leases in keepers:
        leases.stop()


@pytest.fixture
def harness(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()


def one_slot() -> MemoryLimiter:
    return MemoryLimiter(
        LimitTable.from_toml(GENEROUS_LIMITS + f'[models."{SONNET}"]\nmax_concurrency = 1\n')
    )


def test_a_job_runs_once_and_its_answer_and_cost_are_recorded(
    harness: Harness, make_job: MakeJob, job_of: JobOf, prices: PriceTable
) -> None:
    job_id = make_job("Say hello.")

    assert harness.runner.run(job_id) == "succeeded"

    job = job_of(job_id)
    assert job.status == "succeeded" and job.attempts == 1
    assert job.output_text and job.finished_at is not None
    assert [a.outcome for a in job.attempt_records] == ["succeeded"]
    model_prices = prices.prices_for(SONNET)
    assert model_prices is not None
    usage = Usage(input_tokens=job.input_tokens or 0, output_tokens=job.output_tokens or 0)
    assert job.cost_total == cost_of(usage, model_prices).total > 0
    assert harness.upstream.calls == 1
    assert harness.limiter.in_flight(SONNET) == 0
    assert harness.announced == [job_id]
    assert harness.published == []


def test_a_transient_failure_is_tried_again_after_a_backoff(
    make_harness: Callable[..., Harness], make_job: MakeJob, job_of: JobOf
) -> None:
    harness = make_harness(retry_base_seconds=0)
    job_id = make_job("[[sim:529 x1]] Say hello.")

    assert harness.runner.run(job_id) == "retrying"
    job = job_of(job_id)
    assert job.status == "retrying" and job.error_type == "overloaded_error"
    assert [p.job_id for p in harness.published] == [job_id]
    assert harness.announced == []
    assert harness.limiter.in_flight(SONNET) == 0

    # The message the runner published comes back: the second call succeeds.
    assert harness.runner.run(job_id) == "succeeded"
    job = job_of(job_id)
    assert job.attempts == 2
    assert [(a.number, a.status_code) for a in job.attempt_records] == [(1, 529), (2, 200)]
    assert harness.announced == [job_id]


def test_a_retry_delivered_before_it_is_due_is_put_off_without_a_call(
    make_harness: Callable[..., Harness], make_job: MakeJob, job_of: JobOf
) -> None:
    harness = make_harness(retry_base_seconds=30, retry_max_seconds=30)
    job_id = make_job("[[sim:529 x1]] Say hello.")
    assert harness.runner.run(job_id) == "retrying"
    backoff = harness.published[0].countdown
    assert backoff is not None and 15 <= backoff <= 30  # equal jitter: half to all of 30 s

    grant = harness.limiter.acquire("early", SONNET, {"max_tokens": 1}, "normal").grant
    assert grant is not None
    assert harness.runner.run(job_id, grant) == "not due"

    early = harness.published[1]
    assert early.job_id == job_id
    assert early.countdown is not None and 0 < early.countdown <= backoff
    assert harness.upstream.calls == 1
    assert harness.limiter.in_flight(SONNET) == 0  # the grant it came with went back
    assert job_of(job_id).status == "retrying"


def test_the_last_attempt_fails_the_job_for_good(
    make_harness: Callable[..., Harness], make_job: MakeJob, job_of: JobOf
) -> None:
    harness = make_harness(retry_base_seconds=0, max_attempts=3)
    job_id = make_job("[[sim:529]] Say hello.")

    outcomes = [harness.runner.run(job_id) for _ in range(3)]

    assert outcomes == ["retrying", "retrying", "failed"]
    job = job_of(job_id)
    assert job.status == "failed" and job.attempts == 3
    assert job.error_message is not None
    assert job.error_message.startswith("gave up after 3 attempts")
    assert len(harness.published) == 2
    assert harness.announced == [job_id]
    assert harness.runner.run(job_id) == "nothing to do"
    assert harness.upstream.calls == 3


def test_a_permanent_error_fails_the_job_at_once(
    harness: Harness, make_job: MakeJob, job_of: JobOf
) -> None:
    job_id = make_job("[[sim:400]] Say hello.")

    assert harness.runner.run(job_id) == "failed"

    job = job_of(job_id)
    assert job.attempts == 1 and job.error_type == "invalid_request_error"
    assert job.upstream_status == 400
    assert harness.published == []


def test_a_job_without_a_slot_waits_in_its_models_queue_until_dispatched(
    make_harness: Callable[..., Harness], make_job: MakeJob, job_of: JobOf
) -> None:
    harness = make_harness(limiter=one_slot())
    limiter = harness.limiter
    held = limiter.acquire("someone-else", SONNET, {"max_tokens": 1}, "normal").grant
    assert held is not None
    job_id = make_job()

    assert harness.runner.run(job_id) == "waiting"
    job = job_of(job_id)
    assert job.status == "queued" and job.waiting_for == "concurrency"
    assert limiter.waiting(SONNET) == [job_id]
    assert limiter.dispatch(SONNET).job_id is None  # the slot is still taken
    assert harness.upstream.calls == 0

    limiter.settle(held, None, called=False)
    offer = limiter.dispatch(SONNET)
    assert offer.job_id == job_id and offer.grant is not None

    assert harness.runner.run(job_id, offer.grant) == "succeeded"
    assert job_of(job_id).waiting_for is None
    assert limiter.in_flight(SONNET) == 0 and limiter.waiting(SONNET) == []


def test_a_key_over_its_own_rpm_has_its_next_job_put_off(
    harness: Harness, make_key: Callable[..., str], make_job: MakeJob, job_of: JobOf
) -> None:
    key_id = make_key(rpm=1)
    first, second = make_job(key_id=key_id), make_job(key_id=key_id)
    before = datetime.now(UTC)

    assert harness.runner.run(first) == "succeeded"
    assert harness.runner.run(second) == "waiting"

    job = job_of(second)
    assert job.status == "queued" and job.waiting_for == "key_rpm"
    # One request a minute: the second goes a minute after the first.
    [put_off] = harness.published
    assert put_off.job_id == second and put_off.countdown == pytest.approx(60, abs=1)
    assert job.next_attempt_at is not None
    assert job.next_attempt_at - before == pytest.approx(timedelta(seconds=60), abs=timedelta(2))
    assert harness.upstream.calls == 1


def test_a_second_delivery_of_a_finished_job_gives_its_grant_back(
    harness: Harness, make_job: MakeJob
) -> None:
    job_id = make_job()
    assert harness.runner.run(job_id) == "succeeded"
    grant = harness.limiter.acquire(job_id, SONNET, {"max_tokens": 1}, "normal").grant
    assert grant is not None and harness.limiter.in_flight(SONNET) == 1

    assert harness.runner.run(job_id, grant) == "nothing to do"

    assert harness.limiter.in_flight(SONNET) == 0
    assert harness.upstream.calls == 1


def test_a_job_of_a_revoked_key_is_canceled_without_a_call(
    harness: Harness, make_key: Callable[..., str], make_job: MakeJob, job_of: JobOf
) -> None:
    key_id = make_key()
    job_id = make_job(key_id=key_id)
    with session_scope(harness.runner.settings.database_url) as session:
        key = session.get(ApiKey, key_id)
        assert key is not None
        key.revoked_at = datetime.now(UTC)

    assert harness.runner.run(job_id) == "key revoked"

    job = job_of(job_id)
    assert job.status == "canceled" and job.error_type == "key_revoked"
    assert harness.upstream.calls == 0
    assert harness.announced == [job_id]


def test_a_job_its_budget_can_no_longer_hold_fails_without_a_call(
    harness: Harness, make_key: Callable[..., str], make_job: MakeJob, job_of: JobOf
) -> None:
    key_id = make_key(monthly_budget_usd=Decimal("0.01"))
    job_id = make_job(key_id=key_id, max_tokens=200)  # fits at intake: at most 0.003 USD
    # Other jobs of the key spent nearly all of it before this one was claimed.
    with session_scope(harness.runner.settings.database_url) as session:
        budgets.record_spend(session, key_id, datetime.now(UTC), Decimal("0.0099"))

    assert harness.runner.run(job_id) == "budget exceeded"

    job = job_of(job_id)
    assert job.status == "failed" and job.error_type == "budget_exceeded_error"
    assert job.attempts == 0  # the claim's attempt is given back: no call was made
    assert harness.upstream.calls == 0
    assert harness.limiter.in_flight(SONNET) == 0
    assert harness.announced == [job_id]


def test_a_budgeted_jobs_reservation_becomes_its_recorded_cost(
    harness: Harness, make_key: Callable[..., str], make_job: MakeJob, job_of: JobOf
) -> None:
    key_id = make_key(monthly_budget_usd=Decimal("10"))
    job_id = make_job(key_id=key_id)

    assert harness.runner.run(job_id) == "succeeded"

    cost = job_of(job_id).cost_total
    assert cost is not None and cost > 0
    with session_scope(harness.runner.settings.database_url) as session:
        repository = BudgetRepository(session)
        spent, reserved = repository.committed(key_id, month_key(datetime.now(UTC)))
        assert repository.reservations(key_id) == []
    assert (spent, reserved) == (cost, Decimal(0))


def test_a_job_with_a_webhook_leaves_its_delivery_to_send(
    harness: Harness, make_job: MakeJob, database_url: str
) -> None:
    job_id = make_job(webhook_url="https://hooks.example.com/promptq")

    assert harness.runner.run(job_id) == "succeeded"

    with session_scope(database_url) as session:
        deliveries = session.query(WebhookDelivery).filter_by(job_id=job_id).all()
        assert [(d.url, d.status, d.event_type) for d in deliveries] == [
            ("https://hooks.example.com/promptq", "pending", "job.succeeded")
        ]
        # Sent once the attempt's transaction committed, after the word to waiters.
        assert harness.sent.sent[-2:] == [
            ("announce_finished", job_id),
            ("deliver_webhook", deliveries[0].id),
        ]


def test_a_429_pauses_the_model_for_the_jobs_that_follow(
    harness: Harness, make_job: MakeJob, job_of: JobOf
) -> None:
    throttled = make_job("[[sim:429 x1]] Say hello.")

    assert harness.runner.run(throttled) == "retrying"
    # The simulator's 429 says retry-after: 1; no retry comes sooner.
    [retry] = harness.published
    assert retry.countdown is not None and retry.countdown >= 1

    next_job = make_job("Another one.")
    assert harness.runner.run(next_job) == "waiting"
    assert job_of(next_job).waiting_for == "upstream_backoff"
    assert harness.upstream.calls == 1


class ForgetfulLimiter(MemoryLimiter):
    """Says once that its state is lost, as a Redis limiter does after a restart."""

    def __init__(self) -> None:
        super().__init__(LimitTable.from_toml(GENEROUS_LIMITS))
        self.lost = True
        self.rebuilt: list[str] = []
        self.asked_to_rebuild_in_place: list[bool] = []

    def acquire(self, *args: Any, rebuild: bool = True, **kwargs: Any) -> Decision:
        self.asked_to_rebuild_in_place.append(rebuild)
        if self.lost and not rebuild:
            raise RebuildNeeded(args[1])
        return super().acquire(*args, rebuild=rebuild, **kwargs)

    def rebuild(self, model: str) -> int:
        self.lost = False
        self.rebuilt.append(model)
        return 0


def test_lost_limiter_state_is_rebuilt_outside_the_claims_transaction(
    make_harness: Callable[..., Harness], make_job: MakeJob, job_of: JobOf
) -> None:
    limiter = ForgetfulLimiter()
    harness = make_harness(limiter)
    job_id = make_job("Say hello.")

    assert harness.runner.run(job_id) == "succeeded"

    # Asked inside the claim never to rebuild there; rebuilt once, then the job went on.
    assert limiter.asked_to_rebuild_in_place == [False, False]
    assert limiter.rebuilt == [SONNET]
    job = job_of(job_id)
    assert job.status == "succeeded" and job.attempts == 1
    assert harness.upstream.calls == 1


def test_a_calls_slot_is_held_through_its_record_and_given_back_before_the_settle(
    make_harness: Callable[..., Harness], make_job: MakeJob, job_of: JobOf, database_url: str
) -> None:
    harness = make_harness()
    slots = harness.runner.call_slots = CallSlots(1)
    during_call: list[int] = []
    at_statements: list[int] = []
    at_settle: list[int] = []
    call = harness.upstream.create_message
    finish = harness.limiter.finish

    def watched_call(params: dict[str, Any], beta: str | None = None) -> Any:
        during_call.append(slots.in_use)
        return call(params, beta)

    def watched_finish(*args: Any, **kwargs: Any) -> None:
        at_settle.append(slots.in_use)
        finish(*args, **kwargs)

    harness.upstream.create_message = watched_call  # type: ignore[method-assign]
    harness.limiter.finish = watched_finish  # type: ignore[method-assign]
    job_id = make_job("Say hello.")
    engine = get_engine(database_url)

    def on_statement(*_: Any) -> None:
        at_statements.append(slots.in_use)

    event.listen(engine, "before_cursor_execute", on_statement)
    try:
        assert harness.runner.run(job_id) == "succeeded"
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)
    assert during_call == [1]
    # The claim and the record held the slot: the next job's call starts once this one's
    # end is written (and its webhooks handed over), before its grant is settled.
    assert len(at_statements) >= 2 and set(at_statements) == {1}
    assert job_of(job_id).finished_at is not None
    assert at_settle == [0]
    assert slots.in_use == 0


def test_once_the_worker_stops_a_job_that_got_no_slot_starts_nothing(
    harness: Harness, make_job: MakeJob, job_of: JobOf
) -> None:
    harness.runner.call_slots = CallSlots(1)
    harness.runner.call_slots.close()
    job_id = make_job("Say hello.")

    with pytest.raises(ShuttingDown):
        harness.runner.run(job_id)
    assert job_of(job_id).status == "queued"
    assert harness.upstream.calls == 0
    assert harness.limiter.in_flight(SONNET) == 0


def test_once_the_worker_stops_a_job_with_a_dispatchers_grant_still_runs(
    make_harness: Callable[..., Harness], make_job: MakeJob, job_of: JobOf
) -> None:
    harness = make_harness(limiter=one_slot())
    job_id = make_job("Say hello.")
    offer = harness.limiter.acquire(job_id, SONNET, {"max_tokens": 16}, "normal")
    assert offer.grant is not None
    harness.runner.call_slots = CallSlots(1)
    harness.runner.call_slots.close()

    assert harness.runner.run(job_id, offer.grant) == "succeeded"
    assert job_of(job_id).status == "succeeded"


class HeldAnnouncement(SentMessages):
    """Sends as SentMessages does, but holds the word that `held` finished (sent as its
    record's session ends, within its turn) until released."""

    def __init__(self, held: str) -> None:
        super().__init__()
        self.held = held
        self.holding = threading.Event()
        self.release = threading.Event()

    def announce_finished(self, job_id: str) -> None:
        if job_id == self.held:
            self.holding.set()
            assert self.release.wait(10), "never released"
        super().announce_finished(job_id)


@pytest.mark.parametrize("turns", [1, 2])
def test_jobs_take_turns_to_record_their_answers(
    make_harness: Callable[..., Harness], make_job: MakeJob, job_of: JobOf, turns: int
) -> None:
    harness = make_harness()
    harness.runner.record_turns = threading.BoundedSemaphore(turns)
    first, second = make_job("One."), make_job("Two.")
    held = harness.runner.messenger = HeldAnnouncement(held=first)
    second_calling, second_answers = threading.Event(), threading.Event()
    call = harness.upstream.create_message

    def second_answers_when_told(params: dict[str, Any], beta: str | None = None) -> Any:
        if "Two." in json.dumps(params):
            second_calling.set()
            assert second_answers.wait(10), "never told to answer"
        return call(params, beta)

    harness.upstream.create_message = second_answers_when_told  # type: ignore[method-assign]
    second_run = threading.Thread(target=harness.runner.run, args=(second,))
    first_run = threading.Thread(target=harness.runner.run, args=(first,))
    second_run.start()
    try:
        assert second_calling.wait(10)
        first_run.start()
        # The first job is in its turn, recorded, its end's word not yet sent.
        assert held.holding.wait(10)
        second_answers.set()
        if turns == 1:
            # Its answer in, the second job waits for the first's turn to end.
            second_run.join(0.3)
            assert second_run.is_alive()
            assert job_of(second).status == "running" and job_of(second).finished_at is None
        else:
            second_run.join(10)
            assert not second_run.is_alive()
            assert job_of(second).status == "succeeded"
        released_at = datetime.now(UTC)
    finally:
        second_answers.set()
        held.release.set()
        first_run.join(10)
        second_run.join(10)
    assert job_of(first).status == job_of(second).status == "succeeded"
    # Its call ended when its answer came; the job, when its record's turn came.
    (second_attempt,) = job_of(second).attempt_records
    assert second_attempt.finished_at.replace(tzinfo=UTC) < released_at
    if turns == 1:
        finished_at = job_of(second).finished_at
        assert finished_at is not None and finished_at.replace(tzinfo=UTC) >= released_at
    assert held.announced == ([first, second] if turns == 1 else [second, first])


def test_a_job_about_to_start_waits_behind_the_answers_before_it(
    make_harness: Callable[..., Harness], make_job: MakeJob, job_of: JobOf
) -> None:
    harness = make_harness()
    harness.runner.record_turns = threading.BoundedSemaphore(1)
    first, second = make_job("One."), make_job("Two.")
    held = harness.runner.messenger = HeldAnnouncement(held=first)
    first_run = threading.Thread(target=harness.runner.run, args=(first,))
    second_run = threading.Thread(target=harness.runner.run, args=(second,))
    first_run.start()
    try:
        assert held.holding.wait(10)
        second_run.start()
        second_run.join(0.3)
        # Not claimed, not called: the first job's turn is not over.
        assert second_run.is_alive()
        assert job_of(second).status == "queued" and harness.upstream.calls == 1
    finally:
        held.release.set()
        first_run.join(10)
        second_run.join(10)
    assert job_of(first).status == job_of(second).status == "succeeded"
    assert harness.upstream.calls == 2
