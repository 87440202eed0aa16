"""spend ledger: a key's recorded spend per UTC month, filled from the jobs recorded so far

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 01:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "spend_ledger",
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("spent", sa.BigInteger(), nullable=False),
        sa.Column("jobs", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("api_key_id", "month"),
    )
    # The months already recorded: the same rule as the budget check used before, the
    # costs of the key's jobs by the UTC month they finished in. One grouped statement in
    # the migration's transaction; it reads jobs without locking them (writers go on).
    if op.get_bind().dialect.name == "postgresql":
        month = "to_char(timezone('UTC', finished_at), 'YYYY-MM')"
    else:
        # SQLite keeps promptq's timestamps as naive UTC text.
        month = "strftime('%Y-%m', finished_at)"
    op.execute(
        f"""
        INSERT INTO spend_ledger (api_key_id, month, spent, jobs)
        SELECT api_key_id, {month}, SUM(cost_total), COUNT(*)
        FROM jobs
        WHERE cost_total IS NOT NULL AND finished_at IS NOT NULL
        GROUP BY api_key_id, {month}
        """
    )


def downgrade() -> None:
    op.drop_table("spend_ledger")
