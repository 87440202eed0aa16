"""The rollups' increments: upserts that add to whatever the row holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    CTE,
    ColumnElement,
    FromClause,
    Insert,
    bindparam,
    func,
    literal_column,
    select,
)
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


def upsert_after(
    table: type[Base],
    keys: tuple[str, ...],
    increments: tuple[str, ...],
    names: Sequence[str],
    prefix: str,
    source: FromClause | None = None,
    after: ColumnElement[bool] | None = None,
) -> Insert:
    """PostgreSQL only: add() as a statement to go in another's WITH (a data-modifying CTE),
    so that one round trip records a job's end and what it adds up to. The row's columns
    `names` are bound parameters named `prefix` + column, given when it runs: the statement
    is the same for every row, so it is built and compiled once (building one costs more
    CPU than running it). It adds the row once for each row of `source` (none: once), which
    makes it conditional on, say, the job's compare-and-set having won; `after`, a term that
    reads another CTE (follows), makes it run after that one, so that locks are taken in
    the house order. RETURNING, so that a later part can read it to follow it in turn."""
    columns = table.__table__.c  # type: ignore[attr-defined]
    values = select(*(bindparam(f"{prefix}{name}", type_=columns[name].type) for name in names))
    if source is not None:
        values = values.select_from(source)
    if after is not None:
        values = values.where(after)
    statement = postgresql.insert(table).from_select(list(names), values)
    return statement.on_conflict_do_update(
        index_elements=[columns[name] for name in keys],
        set_={name: columns[name] + statement.excluded[name] for name in increments},
    ).returning(literal_column("1").label("done"))


def follows(part: CTE) -> ColumnElement[bool]:
    """A term true once `part` has run (it reads all of it): upsert_after's `after`."""
    return select(func.count()).select_from(part).scalar_subquery() >= 0
