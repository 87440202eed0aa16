"""Monthly budgets of client keys: checked at intake, reserved at each job's start."""

from promptq.budgets.service import (
    BUDGET_EXCEEDED,
    BudgetExceeded,
    BudgetState,
    budget_state,
    check_budget,
    max_cost,
    record_spend,
    release,
    reserve,
    spend_after,
    spend_row,
)

__all__ = [
    "BUDGET_EXCEEDED",
    "BudgetExceeded",
    "BudgetState",
    "budget_state",
    "check_budget",
    "max_cost",
    "record_spend",
    "release",
    "reserve",
    "spend_after",
    "spend_row",
]
