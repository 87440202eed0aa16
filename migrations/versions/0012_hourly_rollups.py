"""hourly rollups of jobs, upstream calls and webhook attempts

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 02:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# Upper bounds of the latency histogram, in ms (promptq.models.LATENCY_BUCKETS_MS as of
# this revision: a migration keeps its own copy).
LATENCY_BUCKETS_MS = (100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000, 600000)
TOKENS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
COSTS = ("cost_total", "cost_input", "cost_output", "cost_cache_write", "cost_cache_read")


def _hour(column: str) -> str:
    """The UTC hour a timestamp falls in, as the column type stores it."""
    if op.get_bind().dialect.name == "postgresql":
        return f"(date_trunc('hour', {column} AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')"
    # SQLite keeps promptq's timestamps as naive UTC text in this format.
    return f"strftime('%Y-%m-%d %H:00:00.000000', {column})"


def upgrade() -> None:
    op.create_table(
        "usage_hourly",
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("priced", sa.Boolean(), nullable=False),
        sa.Column("jobs", sa.Integer(), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in TOKENS),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in COSTS),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("hour", "api_key_id", "model", "status", "priced"),
    )
    # A key's own report reads its hours only.
    op.create_index("ix_usage_hourly_key_hour", "usage_hourly", ["api_key_id", "hour"])
    op.create_table(
        "attempt_hourly",
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("status_code", sa.String(length=8), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("latency_ms_sum", sa.BigInteger(), nullable=False),
        *(
            sa.Column(f"le_{index}", sa.Integer(), nullable=False)
            for index in range(len(LATENCY_BUCKETS_MS))
        ),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("hour", "api_key_id", "model", "outcome", "status_code"),
    )
    op.create_table(
        "webhook_hourly",
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=16), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("hour", "kind", "name"),
    )
    backfill()


def backfill() -> None:
    """Webhook figures so far, one grouped INSERT ... SELECT each (they read the tables
    without blocking their writers). The jobs' and calls' rollups are filled by `promptq db
    upgrade` in batches (promptq.jobs.backfill), with the ledger, exactly once."""
    op.execute(
        f"""
        INSERT INTO webhook_hourly (hour, kind, name, count)
        SELECT {_hour("started_at")}, 'attempt',
            CASE
                WHEN status_code IS NULL THEN 'no_response'
                WHEN error IS NULL AND status_code >= 200 AND status_code < 300 THEN 'succeeded'
                ELSE 'http_error'
            END,
            COUNT(*)
        FROM webhook_attempts
        GROUP BY 1, 2, 3
        """
    )
    op.execute(
        f"""
        INSERT INTO webhook_hourly (hour, kind, name, count)
        SELECT {_hour("finished_at")}, 'delivery', status, COUNT(*)
        FROM webhook_deliveries
        WHERE status IN ('succeeded', 'failed') AND finished_at IS NOT NULL
        GROUP BY 1, 2, 3
        """
    )


def downgrade() -> None:
    op.drop_table("webhook_hourly")
    op.drop_table("attempt_hourly")
    op.drop_index("ix_usage_hourly_key_hour", table_name="usage_hourly")
    op.drop_table("usage_hourly")
