"""Records a worker must not drop when the database is away: a job's answer, which was paid
for and would otherwise be asked of the upstream again, and a webhook POST's attempt, whose
delivery would otherwise be sent to its receiver a second time once its lease runs out.
Each is retried through what a restarting, unreachable or (SQLite) locked database raises,
for up to RECORD_PATIENCE_SECONDS; anything else, and anything past that, is raised.

A record whose commit landed but whose answer the link lost is written again: its attempt
row and its hour's count of attempts twice, the rare price of never dropping one. Money is
not doubled: a job's usage and spend follow its compare-and-set, which the second try loses
(promptq.jobs.recording).

    for retrying in RECORD_RETRYING:
        with retrying, session_scope(settings) as session:
            ...  # the record, its whole transaction again on every try
"""

from __future__ import annotations

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from promptq.db import TRANSIENT_DATABASE_ERRORS, reconnected

# How long a worker keeps a record in memory while the database is away.
RECORD_PATIENCE_SECONDS = 300

_backoff = wait_exponential(multiplier=0.5, max=10)


def _at_once_if_reconnected(state: RetryCallState) -> float:
    """No wait before the first retry of a statement that met a connection the database had
    dropped (a restart): the pool has let go of every connection as old, and a new one is
    likely fine. Anything else waits, backing off."""
    outcome = state.outcome
    error = outcome.exception() if outcome is not None else None
    if state.attempt_number == 1 and error is not None and reconnected(error):
        return 0.0
    return float(_backoff(state))


# One for every record: tenacity keeps each run's state in a thread-local (greenlet-local
# under gevent), and building it per job was a visible share of a worker's CPU.
RECORD_RETRYING = Retrying(
    retry=retry_if_exception_type(TRANSIENT_DATABASE_ERRORS),
    wait=_at_once_if_reconnected,
    stop=stop_after_delay(RECORD_PATIENCE_SECONDS),
    reraise=True,
)
