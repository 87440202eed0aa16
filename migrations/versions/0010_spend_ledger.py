"""spend ledger: a key's recorded spend per UTC month; jobs and attempts say whether they
are accounted for (the ledger and the rollups are filled by `promptq db upgrade`)

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

UNACCOUNTED = "accounted = 0 AND status IN ('succeeded', 'failed', 'canceled')"


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
    # Whether a job's end is in the ledger and the rollups (1), or still to be added (0):
    # the code that ends a job sets it in the same transaction as the increments, and
    # `promptq db upgrade` (promptq.jobs.backfill) adds the jobs ended before, or by
    # processes of the previous release, in batches, setting it as it goes, so that no end
    # is counted twice or missed. A constant default: no table rewrite on PostgreSQL.
    for table in ("jobs", "attempts"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(
                sa.Column("accounted", sa.Integer(), nullable=False, server_default="0")
            )
    create_index("ix_jobs_unaccounted", "jobs", ["id"], UNACCOUNTED)


def create_index(name: str, table: str, columns: list[str], where: str) -> None:
    """A partial index; on PostgreSQL built CONCURRENTLY (outside the migration's
    transaction), so writers of a large table are not held up while it builds."""
    options = {"postgresql_where": sa.text(where), "sqlite_where": sa.text(where)}
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.create_index(name, table, columns, postgresql_concurrently=True, **options)
    else:
        op.create_index(name, table, columns, **options)


def downgrade() -> None:
    op.drop_index("ix_jobs_unaccounted", table_name="jobs")
    for table in ("jobs", "attempts"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column("accounted")
    op.drop_table("spend_ledger")
