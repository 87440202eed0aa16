"""Monthly budgets of client keys: refused at intake once spent, and held to at the start
of every job, so that jobs running at once cannot together overshoot the budget.

A key's month is the calendar month in UTC. What counts against the budget is its spend
(the recorded costs of its jobs finished this month, read from the spend ledger, one row per
key and month written in the transaction that records each cost) plus what is reserved for
its running jobs: each job reserves the most it could cost when a worker claims it, in the same
transaction as the claim, and releases it when its attempt is recorded, in the same
transaction as its cost. The check and the reservation are one decision per key at a time
(the key's row is locked on PostgreSQL; SQLite has a single writer), so however many
workers start jobs at once, they overshoot by no more than what the price estimate misses.
The decision reads one ledger row and the key's running reservations, so the key's lock is
held for that and the reservation's insert, whatever the key's history.

Keys without a budget cost nothing here: every entry point returns before any query.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, FromClause, Insert
from sqlalchemy.orm import Session

from promptq.budgets.repository import BudgetRepository
from promptq.clock import utcnow
from promptq.errors import PaymentRequired
from promptq.models import ApiKey, SpendLedger
from promptq.periods import isoformat_z, month_key, next_month_start
from promptq.pricing import PriceTable, cost_of, format_usd
from promptq.ratelimit.estimate import estimate_input_tokens, output_reservation
from promptq.rollups import upsert_after
from promptq.usage import Usage

BUDGET_EXCEEDED = "budget_exceeded_error"


class BudgetExceeded(PaymentRequired):
    """A key's monthly budget is spent; the API answers 402."""

    error_type = BUDGET_EXCEEDED

    def __init__(self, message: str, state: BudgetState) -> None:
        super().__init__(message)
        self.state = state


@dataclass(frozen=True)
class BudgetState:
    """A key's budget this month and what is committed against it, in USD."""

    budget: Decimal
    spent: Decimal
    reserved: Decimal
    # The first moment of next month, UTC: when spending starts from zero again.
    resets_at: datetime

    @property
    def committed(self) -> Decimal:
        return self.spent + self.reserved

    @property
    def remaining(self) -> Decimal:
        return max(Decimal(0), self.budget - self.committed)

    @property
    def reached(self) -> bool:
        return self.committed >= self.budget

    def fits(self, amount: Decimal) -> bool:
        return not self.reached and self.committed + amount <= self.budget

    def describe(self) -> str:
        return (
            f"{format_usd(self.spent)} USD spent this month and {format_usd(self.reserved)} USD "
            f"reserved for jobs in flight, of a monthly budget of {format_usd(self.budget)} USD"
        )

    @property
    def resets(self) -> str:
        return isoformat_z(self.resets_at)


def budget_state(
    session: Session, api_key_id: str, budget: Decimal, now: datetime | None = None
) -> BudgetState:
    now = now or utcnow()
    spent, reserved = BudgetRepository(session).committed(api_key_id, month_key(now))
    return BudgetState(budget, spent, reserved, next_month_start(now))


def record_spend(session: Session, api_key_id: str, finished_at: datetime, cost: Decimal) -> None:
    """Book a job's recorded cost in its key's ledger, for the month it finished in. Call it
    in the transaction that writes the job's cost_total, and only when that write happened
    (a compare-and-set that won), so that the ledger holds each cost exactly once: a crash
    before the commit loses both, a retry after it finds the job already settled."""
    BudgetRepository(session).add_spend(api_key_id, month_key(finished_at), cost)


# The spend ledger's row, as spend_after binds it.
SPEND_COLUMNS = ("api_key_id", "month", "spent", "jobs")


def spend_row(api_key_id: str, finished_at: datetime, cost: Decimal) -> dict[str, Any]:
    """What record_spend() adds to the ledger for one job's cost, by SPEND_COLUMNS."""
    return {"api_key_id": api_key_id, "month": month_key(finished_at), "spent": cost, "jobs": 1}


def spend_after(
    prefix: str, source: FromClause, after: ColumnElement[bool] | None = None
) -> Insert:
    """record_spend() as a part of a PostgreSQL statement's WITH, booked once for each row
    of `source`: the row of the job's compare-and-set, when it won (see
    promptq.rollups.upsert_after). Its values are spend_row()'s, bound as `prefix` +
    column."""
    return upsert_after(
        SpendLedger,
        ("api_key_id", "month"),
        ("spent", "jobs"),
        SPEND_COLUMNS,
        prefix,
        source,
        after,
    )


def check_budget(
    session: Session, key: ApiKey, now: datetime | None = None, cost: Decimal | None = None
) -> None:
    """Refuse a new job of `key` once its budget is reached (spend plus reservations), or,
    given `cost` (the most the job could cost, `max_cost`), when that cannot fit what is
    left: refused at intake rather than accepted and failed when a worker claims it. Call it
    on every path that creates jobs. One query for a key with a budget, none without."""
    budget = key.monthly_budget_usd
    if budget is None:
        return
    state = budget_state(session, key.id, budget, now)
    if state.reached:
        raise BudgetExceeded(
            f"API key {key.name!r} has reached its monthly budget: {state.describe()}. "
            f"New jobs are refused until the budget resets at {state.resets} (the first day "
            "of next month, UTC).",
            state,
        )
    if cost is not None and not state.fits(cost):
        raise BudgetExceeded(
            f"this job could cost up to {format_usd(cost)} USD (its input estimate and "
            f"max_tokens at the model's prices), and API key {key.name!r} has "
            f"{format_usd(state.remaining)} USD left ({state.describe()}); lower max_tokens, "
            f"or wait for the budget to reset at {state.resets} (the first day of next "
            "month, UTC)",
            state,
        )


def max_cost(request: Mapping[str, Any], model: str, prices: PriceTable) -> Decimal:
    """The most a call could cost, at the prices it would be charged: the estimated input
    tokens at the input price (the dearest input-side price when the request asks for
    caching, since cache writes cost more than plain input) plus max_tokens at the output
    price. A model without a price records no cost, so it holds nothing."""
    model_prices = prices.prices_for(model)
    if model_prices is None:
        return Decimal(0)
    input_price = model_prices.input
    if _asks_for_caching(request):
        input_price = max(input_price, model_prices.cache_write, model_prices.cache_write_1h)
    usage = Usage(
        input_tokens=estimate_input_tokens(request), output_tokens=output_reservation(request)
    )
    return cost_of(usage, replace(model_prices, input=input_price)).total


def reserve(
    session: Session,
    prices: PriceTable,
    api_key_id: str,
    job_id: str,
    model: str,
    request: Mapping[str, Any],
    now: datetime | None = None,
) -> str | None:
    """Reserve the most a claimed job could cost against its key's budget, in the claim's
    own transaction: None when it fits (or the key has no budget); otherwise why not, and
    the job must not start (promptq.jobs.execution then fails it with
    `budget_exceeded_error`, so it never reaches the upstream)."""
    repository = BudgetRepository(session)
    key = repository.lock_key(api_key_id)
    if key is None or key.monthly_budget_usd is None:
        return None
    amount = max_cost(request, model, prices)
    state = budget_state(session, api_key_id, key.monthly_budget_usd, now)
    if state.fits(amount):
        repository.reserve(job_id, api_key_id, amount)
        return None
    return (
        f"not started: this job could cost up to {format_usd(amount)} USD "
        f"({estimate_input_tokens(request)} input tokens estimated, max_tokens "
        f"{output_reservation(request)}), and API key {key.name!r} has "
        f"{format_usd(state.remaining)} USD left ({state.describe()}). The budget resets at "
        f"{state.resets} (the first day of next month, UTC)."
    )


def release(session: Session, job_ids: Sequence[str]) -> None:
    """Give back the reservations of jobs whose attempt ended (recorded, or taken back by
    the sweeper); a recorded cost is spend from then on."""
    BudgetRepository(session).release(job_ids)


def _asks_for_caching(request: Mapping[str, Any]) -> bool:
    """Whether any part of the request carries `cache_control` (a block, a tool, or the
    request itself)."""
    pending: list[Any] = [request]
    while pending:
        value = pending.pop()
        if isinstance(value, Mapping):
            if "cache_control" in value:
                return True
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False
