"""usage_hourly_shards, attempt_hourly_shards, webhook_hourly_shards: the hours being written

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 06:00:00.000000

An hour's figures of a key and model (of the deployment, for webhooks) were one row, whose
lock every recording took until its commit. Recordings now add to one of several rows of
their hour in these tables (promptq.rollups.ROLLUP_SHARDS), and each sweeper pass folds the
hours that are over into the tables of 0012 (promptq.rollups.folding); readers read both.
Only tables are added: processes of the previous release go on adding to the tables of
0012 until they are restarted, and their figures count the same.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# As in 0012 (a migration keeps its own copy).
LATENCY_BUCKETS = 12
TOKENS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
COSTS = ("cost_total", "cost_input", "cost_output", "cost_cache_write", "cost_cache_read")
# Each table of 0012: its key, then the figures a fold adds up.
FOLDED = {
    "usage_hourly": (
        ("hour", "api_key_id", "model", "status", "priced"),
        ("jobs", *TOKENS, *COSTS),
    ),
    "attempt_hourly": (
        ("hour", "api_key_id", "model", "outcome", "status_code"),
        ("attempts", "latency_ms_sum", *(f"le_{index}" for index in range(LATENCY_BUCKETS))),
    ),
    "webhook_hourly": (("hour", "kind", "name"), ("count",)),
}


def upgrade() -> None:
    op.create_table(
        "usage_hourly_shards",
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("priced", sa.Boolean(), nullable=False),
        sa.Column("jobs", sa.Integer(), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in TOKENS),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in COSTS),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("hour", "api_key_id", "model", "status", "priced", "shard"),
    )
    op.create_table(
        "attempt_hourly_shards",
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("status_code", sa.String(length=8), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("latency_ms_sum", sa.BigInteger(), nullable=False),
        *(
            sa.Column(f"le_{index}", sa.Integer(), nullable=False)
            for index in range(LATENCY_BUCKETS)
        ),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("hour", "api_key_id", "model", "outcome", "status_code", "shard"),
    )
    op.create_table(
        "webhook_hourly_shards",
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=16), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        sa.PrimaryKeyConstraint("hour", "kind", "name", "shard"),
    )


def downgrade() -> None:
    # Whatever the shards hold, every hour of it, is folded in first: nothing is lost.
    for table, (keys, counts) in FOLDED.items():
        key = ", ".join(keys)
        added = ", ".join(f"{name} = {table}.{name} + excluded.{name}" for name in counts)
        # WHERE true: SQLite would otherwise read ON CONFLICT as the SELECT's join clause.
        op.execute(
            f"INSERT INTO {table} ({key}, {', '.join(counts)}) "
            f"SELECT {key}, {', '.join(f'SUM({name})' for name in counts)} "
            f"FROM {table}_shards WHERE true GROUP BY {key} "
            f"ON CONFLICT ({key}) DO UPDATE SET {added}"
        )
        op.drop_table(f"{table}_shards")
