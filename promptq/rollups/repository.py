"""The rollups' increments: one upsert per row, adding to whatever the row holds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from promptq.models import Base


class RollupRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(
        self, table: type[Base], keys: Mapping[str, Any], increments: Mapping[str, Any]
    ) -> None:
        """INSERT the row, or add `increments` to the row already there. Relative to the
        row's current values, so concurrent recorders each add theirs (the row's lock
        orders them, for the rest of their short transactions)."""
        insert = (
            postgresql.insert
            if self.session.get_bind().dialect.name == "postgresql"
            else sqlite.insert
        )
        statement = insert(table).values(**keys, **increments)
        columns = table.__table__.c  # type: ignore[attr-defined]
        statement = statement.on_conflict_do_update(
            index_elements=[columns[name] for name in keys],
            set_={name: columns[name] + statement.excluded[name] for name in increments},
        )
        self.session.execute(statement)
