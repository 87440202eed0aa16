"""Folding the hours that are over from the rollups' shards tables into their tables.

Recordings spread an hour's figures over ROLLUP_SHARDS rows (usage_hourly_shards and its
kin) so that they seldom wait on one another's locks; once the hour is over nothing needs
that, and readers would add up that many rows where one does (a key's dashboard adds up
every hour it has). So every sweeper pass moves the hours that ended more than FOLD_AFTER
ago into usage_hourly and its kin, one row each: at most FOLD_HOURS_PER_PASS hours per
table, the oldest first. The shards tables hold the last hour or two, so a pass with
nothing to fold costs three index probes. A recording late for its hour (an answer recorded
after a database outage) adds to a shard again; the next pass folds it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from promptq.clock import utcnow
from promptq.db import Database, session_scope
from promptq.rollups.repository import FoldRepository
from promptq.rollups.service import ROLLUPS, floor_hour

# After the end of an hour, the time left for recordings still under way to land in it.
FOLD_AFTER = timedelta(hours=1)
# An hour of one table is one statement; a pass after a long pause catches up in steps.
FOLD_HOURS_PER_PASS = 24


def fold_closed_hours(
    database: Database, now: datetime | None = None, hours_per_pass: int = FOLD_HOURS_PER_PASS
) -> int:
    """Fold the hours over of each rollup, an hour per transaction; the hours folded."""
    before = floor_hour(now or utcnow()) - FOLD_AFTER
    folded = 0
    for rollup in ROLLUPS:
        with session_scope(database) as session:
            hours = FoldRepository(session).hours_to_fold(rollup.shards, before, hours_per_pass)
        for hour in hours:
            with session_scope(database) as session:
                FoldRepository(session).fold(
                    rollup.shards, rollup.table, rollup.keys, rollup.counts, hour
                )
        folded += len(hours)
    return folded
