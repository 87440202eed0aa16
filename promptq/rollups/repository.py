"""The rollups' increments: upserts that add to whatever the row holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from promptq.models import Base


@lru_cache(maxsize=64)
def _upsert(
    table: type[Base], dialect: str, keys: tuple[str, ...], increments: tuple[str, ...]
) -> Insert:
    """One statement object per shape, built once: the statement cache then serves its
    compiled form, and a recording pays for a round trip, not for building SQL."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(table)
    columns = table.__table__.c  # type: ignore[attr-defined]
    return statement.on_conflict_do_update(
        index_elements=[columns[name] for name in keys],
        set_={name: columns[name] + statement.excluded[name] for name in increments},
    )


class RollupRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(
        self, table: type[Base], keys: Mapping[str, Any], increments: Mapping[str, Any]
    ) -> None:
        """INSERT the row, or add `increments` to the row already there. Relative to the
        row's current values, so concurrent recorders each add theirs (the row's lock
        orders them, for the rest of their short transactions)."""
        self.add_many(table, tuple(keys), tuple(increments), [{**keys, **increments}])

    def add_many(
        self,
        table: type[Base],
        keys: tuple[str, ...],
        increments: tuple[str, ...],
        rows: Sequence[Mapping[str, Any]],
    ) -> None:
        """add() for many rows of distinct keys, in one executemany."""
        if not rows:
            return
        dialect = self.session.get_bind().dialect.name
        # The connection, not the session: a Core statement, without the ORM's bulk
        # machinery on top (its columns' types still convert money and times).
        self.session.connection().execute(
            _upsert(table, dialect, keys, increments), [dict(row) for row in rows]
        )
