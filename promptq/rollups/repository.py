"""The rollups' increments: upserts that add to whatever the row holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import (
    CTE,
    ColumnElement,
    FromClause,
    Insert,
    Select,
    bindparam,
    delete,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert

from promptq.db import on_postgresql
from promptq.models import Base


@lru_cache(maxsize=64)
def _upsert(
    table: type[Base], dialect: str, keys: tuple[str, ...], increments: tuple[str, ...]
) -> Insert:
    """One statement object per shape, built once: the statement cache then serves its
    compiled form, and a recording pays for a round trip, not for building SQL."""
    columns = table.__table__.c  # type: ignore[attr-defined]
    if dialect == "postgresql":
        return _adding(postgresql.insert(table), columns, keys, increments)
    return _adding(sqlite.insert(table), columns, keys, increments)


InsertOf = TypeVar("InsertOf", postgresql.Insert, sqlite.Insert)


def _adding(
    statement: InsertOf, columns: Any, keys: Sequence[str], increments: Sequence[str]
) -> InsertOf:
    """`statement`, which on a row already there for `keys` adds `increments` to it."""
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


class FoldRepository:
    """The statements that fold the hours over from a rollup's shards table into its table
    (promptq.rollups.folding)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def hours_to_fold(self, shards: type[Base], before: datetime, limit: int) -> list[datetime]:
        """The oldest hours before `before` in a shards table (its key leads with the hour;
        the table holds the few hours not folded yet)."""
        columns = shards.__table__.c  # type: ignore[attr-defined]
        query = (
            select(columns.hour)
            .where(columns.hour < before)
            .distinct()
            .order_by(columns.hour)
            .limit(limit)
        )
        return list(self.session.scalars(query))

    def fold(
        self,
        shards: type[Base],
        table: type[Base],
        keys: tuple[str, ...],
        counts: tuple[str, ...],
        hour: datetime,
    ) -> None:
        """Add the hour's rows of `shards` to `table`'s (whose key is `keys`), and delete them.

        PostgreSQL: one statement, whose DELETE ... RETURNING gives the sums exactly the
        rows it deletes (a row a late recording adds meanwhile is not deleted unseen: it is
        left for the next fold), and whose upsert takes the table's rows' locks in key
        order. SQLite, whose writers take turns, deletes after adding."""
        source = shards.__table__.c  # type: ignore[attr-defined]
        columns = table.__table__.c  # type: ignore[attr-defined]
        names = [*keys, *counts]

        def sums(rows: Any) -> Select[Any]:
            group = [rows.c[name] for name in keys]
            figures = (func.sum(rows.c[name]) for name in counts)
            return select(*group, *figures).group_by(*group).order_by(*group)

        connection = self.session.connection()
        if on_postgresql(connection):
            gone = delete(shards).where(source.hour == hour).returning(*source).cte("gone")
            upsert = postgresql.insert(table).from_select(names, sums(gone))
            folded: ReturningInsert[Any] = _adding(upsert, columns, keys, counts).returning(
                literal_column("1")
            )
            connection.execute(select(func.count()).select_from(folded.cte("folded")))
            return
        rows = select(*source).where(source.hour == hour).subquery()
        connection.execute(
            _adding(sqlite.insert(table).from_select(names, sums(rows)), columns, keys, counts)
        )
        connection.execute(delete(shards).where(source.hour == hour))


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
    return _adding(statement, columns, keys, increments).returning(
        literal_column("1").label("done")
    )


def follows(part: CTE) -> ColumnElement[bool]:
    """A term true once `part` has run (it reads all of it): upsert_after's `after`."""
    return select(func.count()).select_from(part).scalar_subquery() >= 0
