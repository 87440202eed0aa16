"""indexes that follow the work in flight, and request counters on batches

Partial indexes of active jobs (queued, running, retrying) replace the index on every job's
status; pending deliveries get a partial index of their own, and deliveries one on
subscription_id (an unsubscribe sets it to NULL). Batches count their requests in columns,
filled by `promptq db upgrade` (promptq.jobs.backfill).

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
    "processing_count",
    "succeeded_count",
    "errored_count",
    "canceled_count",
    "expired_count",
)


def _partial(name: str, table: str, columns: list[str], where: str | None = None) -> None:
    """On PostgreSQL built CONCURRENTLY (outside the migration's transaction), so writers
    of a large table are not held up while it builds."""
    options = (
        {}
        if where is None
        else {
            "postgresql_where": sa.text(where),
            "sqlite_where": sa.text(where),
        }
    )
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.create_index(name, table, columns, postgresql_concurrently=True, **options)
    else:
        op.create_index(name, table, columns, **options)


def _drop(name: str, table: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.drop_index(name, table_name=table, postgresql_concurrently=True)
    else:
        op.drop_index(name, table_name=table)


def upgrade() -> None:
    _partial("ix_jobs_active", "jobs", ["id"], ACTIVE)
    _partial("ix_jobs_active_model", "jobs", ["model", "status", "created_at"], ACTIVE)
    _partial("ix_jobs_failed_finished", "jobs", ["finished_at", "id"], "status = 'failed'")
    _drop("ix_jobs_status_next_attempt", "jobs")
    _partial(
        "ix_deliveries_pending_next",
        "webhook_deliveries",
        ["next_attempt_at"],
        "status = 'pending'",
    )
    _drop("ix_deliveries_status_next", "webhook_deliveries")
    _partial("ix_deliveries_subscription", "webhook_deliveries", ["subscription_id"])

    with op.batch_alter_table("message_batches") as batch_op:
        for column in COUNTERS:
            batch_op.add_column(sa.Column(column, sa.Integer(), nullable=False, server_default="0"))
    # Every request starts as processing; each ended one moves to its outcome as its end
    # is accounted for, by the code that ends it or by `promptq db upgrade`'s backfill for
    # the requests ended before (promptq.jobs.backfill), exactly once either way.
    op.execute("UPDATE message_batches SET processing_count = request_count")


def downgrade() -> None:
    with op.batch_alter_table("message_batches") as batch_op:
        for column in COUNTERS:
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
