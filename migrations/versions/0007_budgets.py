"""budgets: reservations of running jobs, and an index for a key's spend in a period

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budget_reservations",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"]),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id"),
    )
    op.create_index("ix_budget_reservations_key", "budget_reservations", ["api_key_id"])
    op.create_index(
        "ix_jobs_key_finished", "jobs", ["api_key_id", "finished_at", "cost_total"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_key_finished", table_name="jobs")
    op.drop_index("ix_budget_reservations_key", table_name="budget_reservations")
    op.drop_table("budget_reservations")
