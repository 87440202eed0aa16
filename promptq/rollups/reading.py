"""What readers of the rollups read: a rollup's table (the hours over, one row each) and its
shards table (the hours being written, and any not folded yet) as one set of rows."""

from __future__ import annotations

from sqlalchemy import Subquery, select, union_all

from promptq.models import Base
from promptq.rollups.service import ROLLUPS

_SHARDS = {rollup.table: rollup.shards for rollup in ROLLUPS}


def rollup_rows(table: type[Base]) -> Subquery:
    """`table`'s rows and its shards' as one subquery of `table`'s columns, named as it is:
    read it as the table (sum its figures, filter and group by its keys), and a condition
    on it reaches both tables' indexes (both PostgreSQL and SQLite push it into each side
    of the UNION ALL). Both sides are read in one statement, so a fold, which moves an hour
    from one to the other in one transaction, is never seen half done."""
    columns = table.__table__.c  # type: ignore[attr-defined]
    shards = _SHARDS[table].__table__.c  # type: ignore[attr-defined]
    return union_all(
        select(*columns), select(*(shards[column.name] for column in columns))
    ).subquery(table.__tablename__)  # type: ignore[attr-defined]
