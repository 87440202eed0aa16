"""promptq.db.on_postgresql, which decides where units of work run as one statement in
autocommit (intake, a job's record, a webhook attempt's record): the same answer for the
database whatever it is handed, settings, a URL, an engine, a connection or a session."""

from __future__ import annotations

from promptq.config import Settings
from promptq.db import get_engine, on_postgresql, session_scope


def test_it_names_the_database_whatever_it_is_handed(database_url: str) -> None:
    expected = database_url.startswith("postgresql")
    settings = Settings(database_url=database_url)
    engine = get_engine(settings)
    assert on_postgresql(settings) is expected
    assert on_postgresql(database_url) is expected
    assert on_postgresql(engine) is expected
    with engine.connect() as connection:
        assert on_postgresql(connection) is expected
    with session_scope(settings) as session:
        assert on_postgresql(session) is expected
