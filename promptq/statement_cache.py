"""psycopg's cache of parsed statements, opened to promptq's long ones.

psycopg turns a statement's `%(name)s` placeholders into PostgreSQL's `$1, $2...` by parsing
its text, and keeps what it parsed in a cache of 128 statements, but only for statements of
at most 4,096 bytes and 50 parameters (psycopg._queries: ORMs' one-off multi-row INSERTs
would only churn it; psycopg discussion #628). A job's record is one statement
(promptq.jobs.recording) of 6 to 9 KB and 85 to 140 parameters, built once per shape and run
for every job: parsed anew each time, it took 8% of a worker's CPU (py-spy, bench/throughput.py
--latency 0). psycopg has no public setting for the limits (3.3), so they are raised here:
module globals it reads on every execution. Were they renamed, statements would only be
parsed every time again, as before; tests/unit/test_statement_cache.py would say so.
"""

from __future__ import annotations

# Room for the record with every column and a few deliveries (about 9 KB, 140 parameters).
# The cache stays 128 statements, so it holds at most a couple of MB.
LONGEST_CACHED_BYTES = 16384
MOST_CACHED_PARAMETERS = 256

LIMITS = {
    "MAX_CACHED_STATEMENT_LENGTH": LONGEST_CACHED_BYTES,
    "MAX_CACHED_STATEMENT_PARAMS": MOST_CACHED_PARAMETERS,
}


def cache_long_statements() -> None:
    """Raise psycopg's limits on the statements it caches (never lower them)."""
    try:
        from psycopg import _queries
    except ImportError:  # no PostgreSQL driver: nothing to tune
        return
    for name, value in LIMITS.items():
        if isinstance(getattr(_queries, name, None), int) and getattr(_queries, name) < value:
            setattr(_queries, name, value)
