"""Monthly budgets (promptq.budgets): the arithmetic of what is left, the most a call could
cost, the refusal at intake and the reservation at each job's start."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy.orm import Session

from promptq import budgets
from promptq.budgets import BudgetExceeded, BudgetState
from promptq.budgets.repository import BudgetRepository
from promptq.config import Settings
from promptq.db import session_scope
from promptq.jobs.execution import claim_job, reserve_budget, runnable_job
from promptq.models import ApiKey, Job
from promptq.pricing import PriceTable
from promptq.ratelimit.estimate import estimate_input_tokens
from promptq.testing import SONNET

MakeJob = Callable[..., str]
RESETS = datetime(2026, 2, 1, tzinfo=UTC)


def state(budget: str, spent: str, reserved: str) -> BudgetState:
    return BudgetState(Decimal(budget), Decimal(spent), Decimal(reserved), RESETS)


def test_what_is_left_is_the_budget_less_spend_and_reservations() -> None:
    current = state("10", "6.5", "1.25")
    assert current.committed == Decimal("7.75")
    assert current.remaining == Decimal("2.25")
    assert not current.reached
    assert current.fits(Decimal("2.25")) and not current.fits(Decimal("2.250000000001"))


def test_a_budget_overshot_has_nothing_left_and_fits_nothing() -> None:
    current = state("10", "9", "2")
    assert current.reached and current.remaining == 0
    assert not current.fits(Decimal(0))


def test_the_description_names_every_figure_and_the_reset() -> None:
    current = state("10", "6.5", "1.25")
    text = current.describe()
    assert text == (
        "6.5 USD spent this month and 1.25 USD reserved for jobs in flight, "
        "of a monthly budget of 10 USD"
    )
    assert current.resets == "2026-02-01T00:00:00Z"


def test_the_most_a_call_could_cost_is_its_input_estimate_and_max_tokens(
    prices: PriceTable,
) -> None:
    request = {"model": SONNET, "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]}
    input_tokens = estimate_input_tokens(request)
    # 3 USD per million input tokens, 15 per million output: exact, no rounding.
    expected = Decimal(input_tokens) * 3 / 10**6 + Decimal(1000) * 15 / 10**6
    assert budgets.max_cost(request, SONNET, prices) == expected


def test_a_request_that_asks_for_caching_is_priced_at_the_dearest_input_price(
    prices: PriceTable,
) -> None:
    block = {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}
    request = {
        "model": SONNET,
        "max_tokens": 10,
        "messages": [{"role": "user", "content": [block]}],
    }
    input_tokens = estimate_input_tokens(request)
    # The one-hour cache write, 6 USD per million, is Sonnet 4.5's dearest input price.
    expected = Decimal(input_tokens) * 6 / 10**6 + Decimal(10) * 15 / 10**6
    assert budgets.max_cost(request, SONNET, prices) == expected


def test_a_model_without_a_price_holds_nothing(prices: PriceTable) -> None:
    request = {"model": "my-own-model", "max_tokens": 10**6, "messages": []}
    assert budgets.max_cost(request, "my-own-model", prices) == 0


def key_of(session: Session, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    assert key is not None
    return key


def test_intake_refuses_a_key_whose_budget_is_spent(
    database_url: str, make_key: Callable[..., str]
) -> None:
    key_id = make_key(monthly_budget_usd=Decimal(1))
    with session_scope(database_url) as session:
        budgets.check_budget(session, key_of(session, key_id))  # nothing spent: no refusal
        budgets.record_spend(session, key_id, datetime.now(UTC), Decimal(1))
    with session_scope(database_url) as session, pytest.raises(BudgetExceeded) as refused:
        budgets.check_budget(session, key_of(session, key_id))
    assert "has reached its monthly budget" in str(refused.value)
    assert refused.value.state.spent == Decimal(1)


def test_intake_refuses_a_job_that_could_cost_more_than_what_is_left(
    database_url: str, make_key: Callable[..., str]
) -> None:
    key_id = make_key(monthly_budget_usd=Decimal(1))
    with session_scope(database_url) as session:
        budgets.record_spend(session, key_id, datetime.now(UTC), Decimal("0.75"))
    with session_scope(database_url) as session:
        key = key_of(session, key_id)
        budgets.check_budget(session, key, cost=Decimal("0.25"))  # exactly what is left
        with pytest.raises(BudgetExceeded, match=r"could cost up to 0\.26 USD"):
            budgets.check_budget(session, key, cost=Decimal("0.26"))


def test_jobs_starting_together_cannot_reserve_more_than_the_budget(
    settings: Settings,
    prices: PriceTable,
    make_key: Callable[..., str],
    make_job: MakeJob,
    job_of: Callable[[str], Job],
) -> None:
    # Each job may cost up to about 0.0015 USD (100 output tokens at 15 USD per million):
    # the budget holds two of them at once, not three.
    key_id = make_key(monthly_budget_usd=Decimal("0.0035"))
    job_ids = [make_job(key_id=key_id, max_tokens=100) for _ in range(3)]
    refusals = []
    with session_scope(settings.database_url) as session:
        for job_id in job_ids:
            job = runnable_job(session, job_id)
            assert job is not None
            claimed = claim_job(session, settings, job)
            assert claimed is not None
            refusals.append(reserve_budget(session, settings, prices, claimed))

    assert refusals[:2] == [None, None]
    assert refusals[2] is not None and "not started" in refusals[2].message
    assert job_of(job_ids[2]).error_type == "budget_exceeded_error"
    with session_scope(settings.database_url) as session:
        reserved = BudgetRepository(session).reservations(key_id)
        assert sorted(r.job_id for r in reserved) == sorted(job_ids[:2])
        budgets.release(session, job_ids[:1])
    with session_scope(settings.database_url) as session:
        assert [r.job_id for r in BudgetRepository(session).reservations(key_id)] == job_ids[1:2]
