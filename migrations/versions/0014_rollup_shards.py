"""usage_hourly, attempt_hourly and webhook_hourly: a shard column in the primary key

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 06:00:00.000000

An hour's figures of a key and model (of the deployment, for webhooks) were one row, whose
lock every recording took until its commit; they are now spread over several rows
(promptq.rollups.ROLLUP_SHARDS), which readers sum, and folded back into shard 0 once the
hour is over (promptq.rollups.folding). The rows already there become shard 0.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# Each table's primary key before this revision (the shard column is added at its end).
KEYS = {
    "usage_hourly": ("hour", "api_key_id", "model", "status", "priced"),
    "attempt_hourly": ("hour", "api_key_id", "model", "outcome", "status_code"),
    "webhook_hourly": ("hour", "kind", "name"),
}


def upgrade() -> None:
    for table, keys in KEYS.items():
        _set_primary_key(table, keys, with_shard=True)
        # The rows left to fold into shard 0 (promptq.rollups.folding).
        op.create_index(
            f"ix_{table}_unfolded",
            table,
            ["hour"],
            postgresql_where=sa.text("shard > 0"),
            sqlite_where=sa.text("shard > 0"),
        )


def downgrade() -> None:
    for table, keys in KEYS.items():
        op.drop_index(f"ix_{table}_unfolded", table_name=table)
        # The shards of one hour are folded into one row first, or the old key would not
        # hold.
        counts = [
            column["name"]
            for column in sa.inspect(op.get_bind()).get_columns(table)
            if column["name"] not in (*keys, "shard")
        ]
        folded = ", ".join(f"SUM({name}) AS {name}" for name in counts)
        columns = ", ".join((*keys, *counts))
        op.execute(
            f"CREATE TEMPORARY TABLE {table}_folded AS SELECT {', '.join(keys)}, "
            f"{folded} FROM {table} GROUP BY {', '.join(keys)}"
        )
        op.execute(f"DELETE FROM {table}")
        op.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {table}_folded")
        op.execute(f"DROP TABLE {table}_folded")
        _set_primary_key(table, keys, with_shard=False)


def _set_primary_key(table: str, keys: tuple[str, ...], with_shard: bool) -> None:
    """PostgreSQL alters the key in place; SQLite, which cannot, copies the table (batch
    mode), its key then the old one plus the new column's."""
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint(f"{table}_pkey", table, type_="primary")
        if with_shard:
            op.add_column(
                table, sa.Column("shard", sa.SmallInteger(), nullable=False, server_default="0")
            )
            op.create_primary_key(f"{table}_pkey", table, [*keys, "shard"])
        else:
            op.drop_column(table, "shard")
            op.create_primary_key(f"{table}_pkey", table, list(keys))
        return
    with op.batch_alter_table(table, recreate="always") as batch_op:
        if with_shard:
            # primary_key=True as well: the copy's columns then agree with its new key.
            batch_op.add_column(
                sa.Column(
                    "shard",
                    sa.SmallInteger(),
                    primary_key=True,
                    nullable=False,
                    server_default="0",
                )
            )
            batch_op.create_primary_key(f"{table}_pkey", [*keys, "shard"])
        else:
            batch_op.drop_column("shard")
            batch_op.create_primary_key(f"{table}_pkey", list(keys))
