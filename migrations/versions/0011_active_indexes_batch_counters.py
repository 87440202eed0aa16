"""indexes that follow the work in flight, and request counters on batches

Partial indexes of active jobs (queued, running, retrying) replace the index on every job's
status; pending deliveries get a partial index of their own, and deliveries one on
subscription_id (an unsubscribe sets it to NULL). Batches count their requests in columns,
filled here from their jobs.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 01:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

ACTIVE = "status IN ('queued', 'running', 'retrying')"
COUNTERS = (
    ("processing_count", "status NOT IN ('succeeded', 'failed', 'canceled')"),
    ("succeeded_count", "status = 'succeeded'"),
    ("errored_count", "status = 'failed'"),
    (
        "canceled_count",
        "status = 'canceled' AND (error_type IS NULL OR error_type != 'expired_error')",
    ),
    ("expired_count", "status = 'canceled' AND error_type = 'expired_error'"),
)


def _partial(name: str, table: str, columns: list[str], where: str) -> None:
    op.create_index(
        name,
        table,
        columns,
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
    )


def upgrade() -> None:
    _partial("ix_jobs_active", "jobs", ["id"], ACTIVE)
    _partial("ix_jobs_active_model", "jobs", ["model", "status", "created_at"], ACTIVE)
    _partial("ix_jobs_failed_finished", "jobs", ["finished_at", "id"], "status = 'failed'")
    op.drop_index("ix_jobs_status_next_attempt", table_name="jobs")
    _partial(
        "ix_deliveries_pending_next",
        "webhook_deliveries",
        ["next_attempt_at"],
        "status = 'pending'",
    )
    op.drop_index("ix_deliveries_status_next", table_name="webhook_deliveries")
    op.create_index("ix_deliveries_subscription", "webhook_deliveries", ["subscription_id"])

    with op.batch_alter_table("message_batches") as batch_op:
        for column, _ in COUNTERS:
            batch_op.add_column(sa.Column(column, sa.Integer(), nullable=False, server_default="0"))
    # Each batch's counts from its requests, through ix_jobs_batch_status.
    for column, where in COUNTERS:
        op.execute(
            f"UPDATE message_batches SET {column} = (SELECT COUNT(*) FROM jobs "
            f"WHERE jobs.batch_id = message_batches.id AND {where})"
        )


def downgrade() -> None:
    with op.batch_alter_table("message_batches") as batch_op:
        for column, _ in COUNTERS:
            batch_op.drop_column(column)
    op.drop_index("ix_deliveries_subscription", table_name="webhook_deliveries")
    op.create_index(
        "ix_deliveries_status_next", "webhook_deliveries", ["status", "next_attempt_at"]
    )
    op.drop_index("ix_deliveries_pending_next", table_name="webhook_deliveries")
    op.create_index("ix_jobs_status_next_attempt", "jobs", ["status", "next_attempt_at"])
    op.drop_index("ix_jobs_failed_finished", table_name="jobs")
    op.drop_index("ix_jobs_active_model", table_name="jobs")
    op.drop_index("ix_jobs_active", table_name="jobs")
