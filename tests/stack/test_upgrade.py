"""Upgrade in place: a database written by the previous release (schema 0009: no ledger, no
rollups, no batch counters) holding 100,000 jobs is brought to head by the real `promptq db
upgrade`, which accounts for every ended job in the spend ledger, the hourly rollups and its
batch's counts, in batches, exactly once; and for what the previous release's processes end
afterwards, in the next pass."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import database_at
from helpers import REPO
from money_helpers import summed
from sqlalchemy import BigInteger, func, select, text, type_coerce

from promptq.db import get_engine, session_scope
from promptq.jobs.backfill import backfill
from promptq.models import (
    LATENCY_BUCKETS_MS,
    Attempt,
    AttemptHourly,
    Job,
    MessageBatch,
    SpendLedger,
    UsageHourly,
)
from promptq.periods import month_key
from promptq.rollups import floor_hour
from promptq.rollups.reading import rollup_rows

JOBS = 100_000
BASE = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1", "claude-sonnet-4-6")


def _seed(url: str) -> None:
    """What the previous release leaves: jobs of three keys and four models over ten weeks,
    succeeded (priced or not), failed, canceled, queued and running; an attempt for each
    call (a retried 529 for some); an ended batch of 5,000 requests."""
    engine = get_engine(url)
    dialect = engine.dialect.name
    if dialect == "postgresql":
        # bigint: the costs in picodollars outgrow an integer.
        series = "SELECT CAST(generate_series(1, :n) AS BIGINT) AS x"
        pad = "lpad(x::text, 21, '0')"
        minutes = "(CAST(:base AS timestamptz) - (x * interval '1 minute'))"
    else:
        series = (
            "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < :n) "
            "SELECT x FROM g"
        )
        pad = "printf('%021d', x)"
        minutes = "strftime('%Y-%m-%d %H:%M:%f', :base, '-' || x || ' minutes')"
    status = """CASE
        WHEN x % 20 < 14 OR x % 20 = 19 THEN 'succeeded'
        WHEN x % 20 < 16 THEN 'failed'
        WHEN x % 20 = 16 THEN 'canceled'
        WHEN x % 20 = 17 THEN 'queued'
        ELSE 'running' END"""
    priced = "(x % 20 < 12 OR x % 20 = 19)"
    ended = "x % 20 < 17 OR x % 20 = 19"
    model = "CASE x % 4 " + " ".join(f"WHEN {i} THEN '{m}'" for i, m in enumerate(MODELS)) + " END"
    with engine.begin() as connection:
        for i in range(3):
            connection.execute(
                text(
                    "INSERT INTO api_keys (id, name, key_hash, key_prefix, webhook_secret, "
                    "created_at) VALUES (:id, :name, :hash, 'pq_x', 'whsec_x', :at)"
                ),
                {"id": f"key_{i}", "name": f"key {i}", "hash": f"{i:064d}", "at": BASE},
            )
        connection.execute(
            text(
                "INSERT INTO message_batches (id, api_key_id, processing_status, request_count, "
                "created_at, expires_at, ended_at) VALUES ('msgbatch_a', 'key_1', 'ended', "
                ":count, :at, :at, :at)"
            ),
            {"count": JOBS // 20, "at": BASE},
        )
        connection.execute(
            text(
                f"""
                INSERT INTO jobs (id, api_key_id, status, model, priority, request, attempts,
                    max_attempts, created_at, updated_at, started_at, finished_at, input_tokens,
                    output_tokens, cache_creation_input_tokens, cache_read_input_tokens,
                    cost_input, cost_output, cost_cache_write, cost_cache_read, cost_total,
                    webhook_attempts, batch_id)
                SELECT 'job_00000' || {pad},
                    CASE WHEN x % 20 = 19 THEN 'key_1' ELSE 'key_' || (x % 3) END,
                    {status}, {model}, 'normal', '{{}}', 1, 4, {minutes}, {minutes},
                    {minutes},
                    CASE WHEN {ended} THEN {minutes} END,
                    CASE WHEN x % 20 < 14 OR x % 20 = 19 THEN x ELSE NULL END,
                    CASE WHEN x % 20 < 14 OR x % 20 = 19 THEN 2 * x ELSE NULL END,
                    CASE WHEN x % 20 < 14 OR x % 20 = 19 THEN x % 7 ELSE NULL END,
                    CASE WHEN x % 20 < 14 OR x % 20 = 19 THEN x % 11 ELSE NULL END,
                    CASE WHEN {priced} THEN 3000000 * x END,
                    CASE WHEN {priced} THEN 30000000 * x END,
                    CASE WHEN {priced} THEN 37 * (x % 7) END,
                    CASE WHEN {priced} THEN 3 * (x % 11) END,
                    CASE WHEN {priced} THEN 33000000 * x + 37 * (x % 7) + 3 * (x % 11) END,
                    0,
                    CASE WHEN x % 20 = 19 THEN 'msgbatch_a' END
                FROM ({series}) AS s
                """
            ),
            {"n": JOBS, "base": BASE.strftime("%Y-%m-%d %H:%M:%S+00:00")},
        )
        # A call for every job that reached the upstream; a 529 before it for some.
        connection.execute(
            text(
                """
                INSERT INTO attempts (job_id, number, started_at, finished_at, latency_ms,
                    outcome, status_code)
                SELECT id, 1, created_at, COALESCE(finished_at, created_at),
                    CAST(COALESCE(input_tokens, 1234) AS INTEGER) % 7000 + 40,
                    CASE WHEN status = 'failed' THEN 'permanent' ELSE 'succeeded' END,
                    CASE WHEN status = 'failed' THEN 400 ELSE 200 END
                FROM jobs WHERE status IN ('succeeded', 'failed')
                """
            )
        )
        connection.execute(
            text(
                """
                INSERT INTO attempts (job_id, number, started_at, finished_at, latency_ms,
                    outcome, status_code)
                SELECT id, 0, created_at, created_at, 90000, 'transient', 529
                FROM jobs WHERE status = 'succeeded' AND input_tokens % 40 = 0
                """
            )
        )


@pytest.fixture
def previous_release(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A database at 0009 (the previous release's schema) with its 100,000 jobs."""
    with database_at("0009", database_url, tmp_path) as url:
        _seed(url)
        yield url


def _pico(value: Decimal | None) -> int:
    return int((value or Decimal(0)) * 10**12)


def expected_from_rows(url: str) -> dict[str, Any]:
    """The ledger, rollups and batch counts, summed here from the jobs and attempts."""
    ledger: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    usage: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0] * 10)
    attempts: dict[tuple[Any, ...], list[int]] = defaultdict(
        lambda: [0] * (2 + len(LATENCY_BUCKETS_MS))
    )
    batch: dict[str, int] = defaultdict(int)
    owners: dict[str, tuple[str, str]] = {}
    with session_scope(url) as session:
        columns = (
            Job.id,
            Job.api_key_id,
            Job.model,
            Job.status,
            Job.finished_at,
            Job.batch_id,
            Job.input_tokens,
            Job.output_tokens,
            Job.cache_creation_input_tokens,
            Job.cache_read_input_tokens,
            Job.cost_total,
            Job.cost_input,
            Job.cost_output,
            Job.cost_cache_write,
            Job.cost_cache_read,
        )
        for job in session.execute(select(*columns)):
            if job.finished_at is None:
                continue
            owners[job.id] = (job.api_key_id, job.model)
            if job.cost_total is not None:
                entry = ledger[(job.api_key_id, month_key(job.finished_at))]
                entry[0] += _pico(job.cost_total)
                entry[1] += 1
            key = (
                floor_hour(job.finished_at),
                job.api_key_id,
                job.model,
                job.status,
                job.cost_total is not None,
            )
            values = (
                1,
                job.input_tokens or 0,
                job.output_tokens or 0,
                job.cache_creation_input_tokens or 0,
                job.cache_read_input_tokens or 0,
                _pico(job.cost_total),
                _pico(job.cost_input),
                _pico(job.cost_output),
                _pico(job.cost_cache_write),
                _pico(job.cost_cache_read),
            )
            usage[key] = [a + b for a, b in zip(usage[key], values, strict=True)]
            if job.batch_id is not None:
                batch[job.status] += 1
        attempt_columns = (
            Attempt.job_id,
            Attempt.finished_at,
            Attempt.outcome,
            Attempt.status_code,
            Attempt.latency_ms,
        )
        for attempt in session.execute(select(*attempt_columns)):
            if attempt.job_id not in owners:
                continue
            code = str(attempt.status_code) if attempt.status_code is not None else "none"
            key = (floor_hour(attempt.finished_at), *owners[attempt.job_id], attempt.outcome, code)
            values = (
                1,
                attempt.latency_ms,
                *(int(attempt.latency_ms <= bound) for bound in LATENCY_BUCKETS_MS),
            )
            attempts[key] = [a + b for a, b in zip(attempts[key], values, strict=True)]
    return {
        "ledger": {k: tuple(v) for k, v in ledger.items()},
        "usage": {k: tuple(v) for k, v in usage.items()},
        "attempts": {k: tuple(v) for k, v in attempts.items()},
        "batch": dict(batch),
    }


def stored(url: str) -> dict[str, Any]:
    with session_scope(url) as session:
        ledger = {
            (r.api_key_id, r.month): (_pico(r.spent), r.jobs)
            for r in session.scalars(select(SpendLedger))
        }
        usage = summed(
            (
                (r.hour, r.api_key_id, r.model, r.status, r.priced),
                (
                    r.jobs,
                    r.input_tokens,
                    r.output_tokens,
                    r.cache_creation_input_tokens,
                    r.cache_read_input_tokens,
                    _pico(r.cost_total),
                    _pico(r.cost_input),
                    _pico(r.cost_output),
                    _pico(r.cost_cache_write),
                    _pico(r.cost_cache_read),
                ),
            )
            for r in session.execute(select(rollup_rows(UsageHourly)))
        )
        attempts = summed(
            (
                (r.hour, r.api_key_id, r.model, r.outcome, r.status_code),
                (
                    r.attempts,
                    r.latency_ms_sum,
                    *(getattr(r, f"le_{i}") for i in range(len(LATENCY_BUCKETS_MS))),
                ),
            )
            for r in session.execute(select(rollup_rows(AttemptHourly)))
        )
        found = session.get(MessageBatch, "msgbatch_a")
        assert found is not None
        batch = {
            status: count
            for status, count in (
                ("succeeded", found.succeeded_count),
                ("failed", found.errored_count),
            )
            if count
        }
        assert found.processing_count == 0
    return {"ledger": ledger, "usage": usage, "attempts": attempts, "batch": batch}


# Seeding, upgrading and summing 100,000 jobs twice over takes a while on a shared machine.
@pytest.mark.timeout(900)
def test_upgrade_accounts_for_every_ended_job_once_in_batches(previous_release: str) -> None:
    url = previous_release
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
    result = subprocess.run(
        [sys.executable, "-m", "promptq", "db", "upgrade"],
        env={**clean, "PROMPTQ_DATABASE_URL": url},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    ended = JOBS - JOBS // 10  # queued and running ones have not ended
    assert f"accounted for {ended} ended jobs" in result.stdout
    # In batches of a thousand, each its own transaction: never one long one.
    assert f"({ended // 1000} batches" in result.stdout
    assert "will be deleted by the next prune" in result.stdout

    expected = expected_from_rows(url)
    assert len(expected["ledger"]) >= 6 and len(expected["usage"]) > 1000
    assert stored(url) == expected
    with session_scope(url) as session:
        total = session.scalar(select(func.sum(type_coerce(SpendLedger.spent, BigInteger))))
        direct = session.scalar(select(func.sum(type_coerce(Job.cost_total, BigInteger))))
        assert int(total or 0) == int(direct or 0) > 0

    # Nothing is counted twice by a second run.
    again = backfill(url)
    assert (again.jobs, again.attempts) == (0, 0)
    assert stored(url) == expected

    # A process of the previous release ends a job after the upgrade (it knows nothing of
    # the ledger): the next pass, as every sweep runs one, counts it, once.
    with session_scope(url) as session:
        job = session.scalars(select(Job).where(Job.status == "queued").limit(1)).one()
        job.status, job.finished_at = "succeeded", BASE
        job.cost_total, job.cost_input = Decimal("0.5"), Decimal("0.5")
    assert backfill(url).jobs == 1
    assert stored(url) == expected_from_rows(url)
