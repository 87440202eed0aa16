"""Run Alembic migrations from code (`promptq db upgrade`, `promptq up`, the tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from promptq.db import get_engine
from promptq.jobs.backfill import BackfillReport, backfill


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> BackfillReport | None:
    """Migrations to `revision`; at head, then the backfill of the ledger and rollups for
    ends recorded before they existed (in batches, after the migrations have committed)."""
    command.upgrade(alembic_config(database_url), revision)
    if revision != "head":
        return None
    return backfill(database_url)


def schema_revisions(database_url: str) -> tuple[str | None, str]:
    """(the database's revision, or None before the first migration; the code's head)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    assert head is not None
    with get_engine(database_url).connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    return current, head
