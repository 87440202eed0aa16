"""psycopg caches what it parsed of a job's record statement (promptq.statement_cache):
its limits still exist under their names, and the record fits in them."""

from __future__ import annotations

from typing import Any

from psycopg import _queries
from psycopg.adapt import Transformer
from sqlalchemy.dialects import postgresql

from promptq.jobs.recording import Shape, _statement
from promptq.models import Attempt, Job
from promptq.rollups import ATTEMPT_COUNTS, ATTEMPT_SHARD_KEYS, USAGE_COUNTS, USAGE_SHARD_KEYS
from promptq.statement_cache import LIMITS, cache_long_statements


def widest_record() -> tuple[bytes, dict[str, Any]]:
    """The record's statement with every column it could write, a spend and two webhook
    deliveries, as psycopg receives it from SQLAlchemy."""
    shape = Shape(
        attempt=tuple(column.name for column in Attempt.__table__.c if column.name != "id"),
        values=tuple(
            column.name
            for column in Job.__table__.c
            if column.name not in {"id", "api_key_id", "created_at", "request", "model"}
        ),
        usage=(*USAGE_SHARD_KEYS, *USAGE_COUNTS),
        call=(*ATTEMPT_SHARD_KEYS, *ATTEMPT_COUNTS),
        spend=True,
        deliveries=2,
    )
    compiled = _statement(shape).compile(dialect=postgresql.psycopg.dialect())
    return str(compiled).encode(), dict.fromkeys(compiled.params)


def test_psycopg_still_has_the_limits_under_their_names() -> None:
    for name in LIMITS:
        assert isinstance(getattr(_queries, name, None), int), name


def test_the_record_is_parsed_once_then_taken_from_the_cache() -> None:
    cache_long_statements()
    query, params = widest_record()
    # Beyond psycopg's own limits (4,096 bytes, 50 parameters): why they are raised.
    assert len(query) > 4096 and len(params) > 50
    for _ in range(2):
        _queries.PostgresQuery(Transformer()).convert(query, params)
    before = _queries._query2pg.cache_info().hits
    _queries.PostgresQuery(Transformer()).convert(query, params)
    assert _queries._query2pg.cache_info().hits == before + 1
