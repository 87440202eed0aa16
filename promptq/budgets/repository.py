"""All queries on budgets: a key's committed money (its month's ledger row, and the
reservations of its running jobs), and the ledger's increments."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from sqlalchemy import BigInteger, delete, func, select, type_coerce
from sqlalchemy.orm import Session

from promptq.models import ApiKey, BudgetReservation, Job, JobStatus, SpendLedger
from promptq.rollups.repository import RollupRepository
from promptq.types import picodollars_to_usd


class BudgetRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def lock_key(self, api_key_id: str) -> ApiKey | None:
        """The key, locked until the transaction ends, so that reservations against its budget
        are decided one at a time across every worker. FOR NO KEY UPDATE (not FOR UPDATE):
        inserting a job checks its foreign key with a KEY SHARE lock on this row, which NO
        KEY UPDATE does not block, so intake never waits on a worker's claim. SQLite ignores
        the clause; its single writer, taken by the claim's UPDATE, serializes instead."""
        query = select(ApiKey).where(ApiKey.id == api_key_id).with_for_update(key_share=True)
        return self.session.scalars(query).first()

    def committed(self, api_key_id: str, month: str) -> tuple[Decimal, Decimal]:
        """(spent, reserved) in USD: the key's ledger row for `month` (the recorded costs
        of its jobs finished in it), and the reservations of its running jobs.

        O(1) in the history: one primary-key lookup, and a sum over the reservations of
        the key's running jobs (as many as it has in flight), never over its finished jobs.
        One statement, hence one snapshot: a job being recorded deletes its reservation and
        adds its cost to the ledger in one transaction, and two statements under READ
        COMMITTED could see the reservation gone but not yet the cost. Integer picodollars.
        """
        spent = (
            select(func.coalesce(func.sum(type_coerce(SpendLedger.spent, BigInteger)), 0))
            .where(SpendLedger.api_key_id == api_key_id, SpendLedger.month == month)
            .scalar_subquery()
        )
        # Only running jobs hold money: a reservation left behind by any path that ended a
        # job without deleting it is never counted.
        reserved = (
            select(func.coalesce(func.sum(type_coerce(BudgetReservation.amount, BigInteger)), 0))
            .join(Job, Job.id == BudgetReservation.job_id)
            .where(BudgetReservation.api_key_id == api_key_id, Job.status == JobStatus.RUNNING)
            .scalar_subquery()
        )
        row = self.session.execute(select(spent, reserved)).one()
        return picodollars_to_usd(int(row[0])), picodollars_to_usd(int(row[1]))

    def add_spend(self, api_key_id: str, month: str, amount: Decimal, jobs: int = 1) -> None:
        """Add a recorded cost to the key's ledger row of `month`, creating the row on the
        month's first cost. One upsert: two workers recording costs of one key at once both
        land (the second waits on the first's row lock, for the rest of a short transaction,
        then adds to its result)."""
        RollupRepository(self.session).add(
            SpendLedger,
            {"api_key_id": api_key_id, "month": month},
            {"spent": amount, "jobs": jobs},
        )

    def reserve(self, job_id: str, api_key_id: str, amount: Decimal) -> None:
        # A row from an earlier attempt that no path deleted would collide with this one.
        self.session.execute(
            delete(BudgetReservation)
            .where(BudgetReservation.job_id == job_id)
            .execution_options(synchronize_session=False)
        )
        self.session.add(BudgetReservation(job_id=job_id, api_key_id=api_key_id, amount=amount))
        self.session.flush()

    def release(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            self.session.execute(
                delete(BudgetReservation)
                .where(BudgetReservation.job_id.in_(job_ids))
                .execution_options(synchronize_session=False)
            )

    def reservations(self, api_key_id: str) -> Sequence[BudgetReservation]:
        query = select(BudgetReservation).where(BudgetReservation.api_key_id == api_key_id)
        return self.session.scalars(query).all()
