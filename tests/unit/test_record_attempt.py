"""record_attempt, what one upstream call comes to in the database, and backoff_seconds,
when the next one may go."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from promptq.budgets.repository import BudgetRepository
from promptq.config import Settings
from promptq.db import session_scope
from promptq.jobs.execution import (
    AttemptVerdict,
    ClaimedJob,
    backoff_seconds,
    claim_job,
    record_attempt,
    runnable_job,
)
from promptq.jobs.repository import JobRepository
from promptq.models import Job, JobStatus
from promptq.periods import month_key
from promptq.pricing import PriceTable
from promptq.testing import SONNET
from promptq.upstream import UpstreamResult
from promptq.upstream.classify import classify_response

MakeJob = Callable[..., str]
JobOf = Callable[[str], Job]


def answer(status: int, payload: object, headers: dict[str, str] | None = None) -> UpstreamResult:
    """An upstream answer, classified as the HTTP client classifies it."""
    body = json.dumps(payload).encode()
    return classify_response(status, {"content-type": "application/json", **(headers or {})}, body)


def message(input_tokens: int = 1_000_000, output_tokens: int = 100_000) -> UpstreamResult:
    return answer(
        200,
        {
            "id": "msg_unit",
            "type": "message",
            "role": "assistant",
            "model": SONNET,
            "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there."}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        },
    )


def overloaded(headers: dict[str, str] | None = None) -> UpstreamResult:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    return answer(529, error, headers)


def invalid() -> UpstreamResult:
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
    return answer(400, error)


def claim(settings: Settings, job_id: str) -> ClaimedJob:
    with session_scope(settings.database_url) as session:
        job = runnable_job(session, job_id)
        assert job is not None
        claimed = claim_job(session, settings, job)
    assert claimed is not None
    return claimed


def record(
    settings: Settings, prices: PriceTable, claimed: ClaimedJob, result: UpstreamResult
) -> AttemptVerdict:
    with session_scope(settings.database_url) as session:
        return record_attempt(session, settings, prices, claimed, result)


def spent_this_month(settings: Settings, key_id: str) -> Decimal:
    with session_scope(settings.database_url) as session:
        spent, _ = BudgetRepository(session).committed(key_id, month_key(datetime.now(UTC)))
    return spent


def test_a_success_records_the_answer_its_usage_and_its_exact_cost_once(
    settings: Settings, prices: PriceTable, make_job: MakeJob, job_of: JobOf
) -> None:
    claimed = claim(settings, make_job())

    verdict = record(settings, prices, claimed, message(1_000_000, 100_000))

    assert verdict.status is JobStatus.SUCCEEDED and verdict.retry_in is None
    job = job_of(claimed.id)
    assert job.output_text == "Hello there."
    assert (job.input_tokens, job.output_tokens) == (1_000_000, 100_000)
    # Sonnet 4.5's list prices: 3 USD per million input tokens, 15 per million output.
    assert (job.cost_input, job.cost_output, job.cost_total) == (
        Decimal(3),
        Decimal("1.5"),
        Decimal("4.5"),
    )
    assert job.lease_expires_at is None and job.finished_at is not None
    assert spent_this_month(settings, claimed.api_key_id) == Decimal("4.5")

    # The same attempt recorded again (a retried transaction) finds the job settled: the
    # call is counted, the cost is not.
    again = record(settings, prices, claimed, message(1_000_000, 100_000))
    assert again.status is JobStatus.RUNNING
    assert spent_this_month(settings, claimed.api_key_id) == Decimal("4.5")
    assert len(job_of(claimed.id).attempt_records) == 2


def test_a_record_made_long_after_its_answer_finishes_the_job_when_it_is_made(
    settings: Settings, prices: PriceTable, make_job: MakeJob, job_of: JobOf
) -> None:
    claimed = claim(settings, make_job())
    # Held five minutes (the database away) since its answer came.
    answered_at = datetime.now(UTC) - timedelta(minutes=5)

    with session_scope(settings.database_url) as session:
        record_attempt(session, settings, prices, claimed, message(), answered_at=answered_at)
    recorded_by = datetime.now(UTC)

    job = job_of(claimed.id)
    (attempt,) = job.attempt_records
    # The call ended when its answer came; the job, when it was recorded: a poller of the
    # most recently finished jobs must find it on top, not five minutes down the list.
    assert attempt.finished_at.replace(tzinfo=UTC) == answered_at
    assert job.finished_at is not None
    assert answered_at + timedelta(minutes=4) < job.finished_at.replace(tzinfo=UTC) <= recorded_by


def test_a_transient_error_schedules_a_retry_no_sooner_than_retry_after(
    settings: Settings, prices: PriceTable, make_job: MakeJob, job_of: JobOf
) -> None:
    claimed = claim(settings, make_job())
    before = datetime.now(UTC)

    verdict = record(settings, prices, claimed, overloaded({"retry-after": "7"}))

    assert verdict.status is JobStatus.RETRYING
    assert verdict.retry_in is not None and verdict.retry_in >= 7
    job = job_of(claimed.id)
    assert job.status == "retrying" and job.error_type == "overloaded_error"
    assert job.finished_at is None and job.lease_expires_at is None
    assert job.next_attempt_at is not None
    assert job.next_attempt_at >= before + timedelta(seconds=verdict.retry_in)
    assert [(a.outcome, a.status_code) for a in job.attempt_records] == [("transient", 529)]
    assert spent_this_month(settings, claimed.api_key_id) == 0


def test_a_transient_error_on_the_last_attempt_fails_the_job_saying_why(
    settings: Settings, prices: PriceTable, make_job: MakeJob, job_of: JobOf
) -> None:
    job_id = make_job()
    for _ in range(settings.max_attempts - 1):
        claimed = claim(settings, job_id)
        assert record(settings, prices, claimed, overloaded()).status is JobStatus.RETRYING
        with session_scope(settings.database_url) as session:  # due now, not after the backoff
            JobRepository(session).transition(job_id, ["retrying"], {"next_attempt_at": None})
    claimed = claim(settings, job_id)
    assert claimed.attempt == settings.max_attempts

    verdict = record(settings, prices, claimed, overloaded())

    assert verdict.status is JobStatus.FAILED
    job = job_of(job_id)
    assert job.status == "failed" and job.finished_at is not None
    assert job.error_message == (
        f"gave up after {settings.max_attempts} attempts; last error: Overloaded"
    )


def test_a_permanent_error_fails_the_job_on_its_first_attempt(
    settings: Settings, prices: PriceTable, make_job: MakeJob, job_of: JobOf
) -> None:
    claimed = claim(settings, make_job())

    verdict = record(settings, prices, claimed, invalid())

    assert verdict.status is JobStatus.FAILED
    job = job_of(claimed.id)
    assert (job.status, job.error_type, job.upstream_status) == (
        "failed",
        "invalid_request_error",
        400,
    )
    assert job.cost_total is None


def test_a_success_after_the_sweeper_took_the_job_back_is_kept(
    settings: Settings, prices: PriceTable, make_job: MakeJob, job_of: JobOf
) -> None:
    claimed = claim(settings, make_job())
    with session_scope(settings.database_url) as session:  # as reclaim_expired leaves it
        JobRepository(session).transition(claimed.id, ["running"], {"status": "retrying"})

    verdict = record(settings, prices, claimed, message(10, 10))

    assert verdict.status is JobStatus.SUCCEEDED
    assert job_of(claimed.id).status == "succeeded"
    assert spent_this_month(settings, claimed.api_key_id) > 0


def test_a_failure_after_the_sweeper_took_the_job_back_leaves_the_job_alone(
    settings: Settings, prices: PriceTable, make_job: MakeJob, job_of: JobOf
) -> None:
    claimed = claim(settings, make_job())
    with session_scope(settings.database_url) as session:
        JobRepository(session).transition(claimed.id, ["running"], {"status": "retrying"})

    verdict = record(settings, prices, claimed, invalid())

    # Not ours any more: the job waits for its next attempt, but the call is on record.
    assert verdict.status is JobStatus.RUNNING
    job = job_of(claimed.id)
    assert job.status == "retrying" and job.error_type is None
    assert [a.status_code for a in job.attempt_records] == [400]


# ------------------------------------------------------------------------------ backoff


def backoff_settings() -> Settings:
    return Settings(_env_file=None, retry_base_seconds=1, retry_max_seconds=30)


@pytest.mark.parametrize(
    ("attempt", "ceiling"), [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (40, 30.0)]
)
def test_backoff_doubles_with_equal_jitter_up_to_its_maximum(attempt: int, ceiling: float) -> None:
    settings = backoff_settings()
    rng = random.Random(attempt)
    delays = [backoff_seconds(attempt, settings, None, rng) for _ in range(500)]
    assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
    # Spread over the whole upper half, not stuck at one end.
    assert min(delays) < ceiling * 0.55 and max(delays) > ceiling * 0.95


def test_backoff_is_never_shorter_than_the_upstreams_retry_after() -> None:
    settings = backoff_settings()
    assert backoff_seconds(1, settings, 45.0, random.Random(0)) == 45.0
    # A shorter retry-after does not cut the backoff.
    assert backoff_seconds(5, settings, 0.5, random.Random(0)) >= 8


def test_backoff_draws_from_the_random_source_it_is_given() -> None:
    settings = backoff_settings()
    first = [backoff_seconds(3, settings, None, random.Random(7)) for _ in range(3)]
    assert first == [first[0]] * 3
    assert backoff_seconds(3, settings, None, random.Random(8)) != first[0]
