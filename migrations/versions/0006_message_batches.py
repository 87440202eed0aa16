"""message batches

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 17:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "message_batches",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("processing_status", sa.String(length=16), nullable=False),
        sa.Column("request_count", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancel_initiated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("message_batches", schema=None) as batch_op:
        batch_op.create_index("ix_batches_key_id", ["api_key_id", "id"], unique=False)
        batch_op.create_index(
            "ix_batches_status_expires", ["processing_status", "expires_at"], unique=False
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("batch_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("custom_id", sa.String(length=64), nullable=True))
        batch_op.create_foreign_key("fk_jobs_batch", "message_batches", ["batch_id"], ["id"])
        batch_op.create_index("ix_jobs_batch_status", ["batch_id", "status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_batch_status")
        batch_op.drop_constraint("fk_jobs_batch", type_="foreignkey")
        batch_op.drop_column("custom_id")
        batch_op.drop_column("batch_id")
    op.drop_table("message_batches")
