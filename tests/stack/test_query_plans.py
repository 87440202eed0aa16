"""Every hot path (intake, claim, record, delivery claim, batch progress, unsubscribe), every
sweeper pass, a prune and every reader of figures (/metrics, usage reports, the dashboard) reads
through an index that follows the work in flight, or the rollups, never a scan of the
history: against a database holding 200,000 finished jobs (with as many attempts and
webhook deliveries), each statement those paths really run is EXPLAINed (EXPLAIN QUERY PLAN
on SQLite), and none may read jobs, attempts or webhook_deliveries sequentially.

The statements are not written out here: they are recorded while the real code runs, so a
query added to a hot path later is checked too."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import _create_postgres_database
from sqlalchemy import event, text

from promptq import budgets
from promptq.batches import service as batches
from promptq.batches.schemas import parse_batch_requests
from promptq.clock import utcnow
from promptq.db import get_engine, session_scope
from promptq.jobs import service as jobs
from promptq.jobs.execution import claim_job, record_attempt, reserve_budget, runnable_job
from promptq.jobs.sweeping import reclaim_expired, stale_runnable_jobs
from promptq.jobspec.schemas import JobCreate
from promptq.keys.service import authenticate, create_key
from promptq.models import Job, MessageBatch
from promptq.pricing import PriceTable
from promptq.testing import SONNET, SentMessages
from promptq.upstream import Outcome, UpstreamResult
from promptq.webhooks import deliveries, subscriptions

FINISHED_JOBS = 200_000
HISTORY_TABLES = ("jobs", "attempts", "webhook_deliveries")
# Partial indexes hold only the work in flight: walking one whole is walking that work.
PARTIAL_INDEXES = {
    "ix_jobs_active",
    "ix_jobs_active_model",
    "ix_jobs_failed_finished",
    "ix_deliveries_pending_next",
}


def _seed_sql(dialect: str) -> list[str]:
    """200,000 finished jobs of one key (one in ten failed), an attempt and a delivery for
    each, written in bulk the way years of use would leave them: ids older than any made
    now, finished over the past days."""
    if dialect == "postgresql":
        series = "SELECT generate_series(1, :n) AS x"
        job_id = "'job_00000' || lpad(x::text, 21, '0')"
        moment = "now() - (x * interval '1 second')"
        request = "'{}'::json"
    else:
        series = (
            "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < :n) "
            "SELECT x FROM g"
        )
        job_id = "'job_00000' || printf('%021d', x)"
        moment = "strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || x || ' seconds')"
        request = "'{}'"
    return [
        f"""
        INSERT INTO jobs (id, api_key_id, status, model, priority, request, attempts,
            max_attempts, created_at, updated_at, started_at, finished_at, input_tokens,
            output_tokens, cache_creation_input_tokens, cache_read_input_tokens, cost_input,
            cost_output, cost_cache_write, cost_cache_read, cost_total, webhook_attempts,
            webhook_url, accounted)
        SELECT {job_id}, :key,
            CASE WHEN x % 10 = 0 THEN 'failed' ELSE 'succeeded' END,
            :model, 'normal', {request}, 1, 4, {moment}, {moment}, {moment}, {moment},
            100, 200, 0, 0, 300000000, 3000000000, 0, 0, 3300000000, 1,
            'https://example.com/hook', 1
        FROM ({series}) AS s
        """,
        """
        INSERT INTO attempts (job_id, number, started_at, finished_at, latency_ms, outcome,
            status_code, accounted)
        SELECT id, 1, started_at, finished_at, 1200, 'succeeded', 200, 1 FROM jobs
        """,
        """
        INSERT INTO webhook_deliveries (id, event_id, job_id, api_key_id, url, event_type,
            body, status, attempts, created_at, finished_at)
        SELECT 'dlv_' || substr(id, 5), 'msg_' || substr(id, 5), id, api_key_id, webhook_url,
            'job.succeeded', '{}', 'succeeded', 1, created_at, finished_at
        FROM jobs
        """,
    ]


@pytest.fixture(scope="module")
def history(
    database_url: str, test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A database of its own (the shared one stays small for the other tests), migrated,
    with one budgeted key and its 200,000 finished jobs; (url, the key in plain)."""
    from promptq.migrate import upgrade

    drop = None
    if database_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path_factory.mktemp('history') / 'promptq.db'}"
    else:
        url, drop = _create_postgres_database(os.environ["PROMPTQ_TEST_DATABASE_URL"])
    upgrade(url)
    with session_scope(url) as session:
        created = create_key(session, "history", monthly_budget_usd=Decimal(1_000_000))
        key_id, plain = created.record.id, created.key
    engine = get_engine(url)
    with engine.begin() as connection:
        for statement in _seed_sql(engine.dialect.name):
            connection.execute(
                text(statement), {"n": FINISHED_JOBS, "key": key_id, "model": SONNET}
            )
    if engine.dialect.name == "postgresql":
        # What autovacuum would have done long since on a database this size.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("ANALYZE"))
    yield url, plain
    engine.dispose()
    if drop is not None:
        drop()


class Recorder:
    """Every statement the code sends, with its parameters, as the driver got them."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, Any]] = []

    def __call__(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        self.statements.append((statement, parameters))


def _run_hot_paths(url: str, plain: str, settings: Any) -> None:
    """What the API, the workers and the sweeper do for a budgeted key's jobs."""
    prices = PriceTable.load(None)
    own = settings.model_copy(update={"database_url": url})
    with session_scope(url) as session:
        key = authenticate(session, plain)
        assert key is not None
        session.expunge(key)
    # Intake, with an idempotency key and a webhook.
    body = {
        "prompt": "hello",
        "model": SONNET,
        "max_tokens": 16,
        "idempotency_key": "once",
        "webhook_url": "http://127.0.0.1:9/hook",
    }
    with session_scope(url) as session:
        job_id = jobs.create_job(session, own, key, JobCreate.model_validate(body)).job.id
    with session_scope(url) as session:
        assert jobs.create_job(session, own, key, JobCreate.model_validate(body)).job.id == job_id
    # Claim, with the budget's reservation; then the record of a paid answer.
    with session_scope(url) as session:
        runnable = runnable_job(session, job_id)
        assert runnable is not None
        claimed = claim_job(session, own, runnable)
        assert claimed is not None
        assert reserve_budget(session, own, prices, claimed) is None
    answer = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": SONNET,
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 10, "output_tokens": 3},
    }
    result = UpstreamResult(Outcome.SUCCEEDED, 200, 800, "req_1", answer, None, None, None, {})
    sent = SentMessages()
    with session_scope(url, sent) as session:
        verdict = record_attempt(session, own, prices, claimed, result)
        budgets.release(session, [job_id])
    assert verdict.status == "succeeded" and len(sent.deliveries) == 1
    # The webhook delivery's claim.
    with session_scope(url) as session:
        assert deliveries.take(session, sent.deliveries[0]) is not None
    # A batch: created, read, one request recorded, the rest canceled.
    requests = parse_batch_requests(
        {
            "requests": [
                {
                    "custom_id": f"r{i}",
                    "params": {
                        "model": SONNET,
                        "max_tokens": 16,
                        "messages": [{"role": "user", "content": f"batch {i}"}],
                    },
                }
                for i in range(3)
            ]
        }
    )
    with session_scope(url) as session:
        view = batches.create_batch(session, own, key, requests)
        batch_id = view.batch.id
    with session_scope(url) as session:
        first = session.query(Job).filter_by(batch_id=batch_id, custom_id="r0").one().id
        assert batches.get_batch(session, key, batch_id).to_api("http://x")
        runnable = runnable_job(session, first)
        assert runnable is not None
        claimed = claim_job(session, own, runnable)
        assert claimed is not None
    with session_scope(url) as session:
        record_attempt(session, own, prices, claimed, result)
    with session_scope(url) as session:
        batches.cancel_batch(session, own, key, batch_id)
    with session_scope(url) as session:
        counts = batches.get_batch(session, key, batch_id).to_api("http://x")["request_counts"]
        assert counts["succeeded"] == 1 and counts["canceled"] == 2
    # A job cancel, and a subscription made and deleted.
    with session_scope(url) as session:
        other = jobs.create_job(
            session, own, key, JobCreate.model_validate({"prompt": "x", "model": SONNET})
        ).job.id
    with session_scope(url) as session:
        jobs.cancel_job(session, key, other)
    with session_scope(url) as session:
        subscription = subscriptions.subscribe(
            session, key, "http://127.0.0.1:9/sub", None, allow_private=True
        ).id
    with session_scope(url) as session:
        subscriptions.unsubscribe(session, key, subscription)
    # The sweeper's passes, with a lease run out and a batch past its time to find.
    with session_scope(url) as session:
        stale = jobs.create_job(
            session, own, key, JobCreate.model_validate({"prompt": "y", "model": SONNET})
        ).job
        stale.status, stale.lease_expires_at = "running", utcnow() - timedelta(seconds=1)
        session.get(MessageBatch, batch_id).expires_at = utcnow()  # type: ignore[union-attr]
    with session_scope(url) as session:
        reclaim_expired(session, own)
    with session_scope(url) as session:
        stale_runnable_jobs(session, own)
        # A pass resumed from a cursor, and its wrap-around to the beginning.
        stale_runnable_jobs(session, own, after_id=job_id)
        stale_runnable_jobs(session, own, up_to_id=job_id)
        batches.expire_and_close(session, own)
        deliveries.due(session, utcnow())
    with session_scope(url) as session:
        jobs.cancel_job(session, key, stale.id)
    # The readers: /metrics, usage reports (a key's and the admin's, every group_by) and
    # the dashboard read the jobs in flight and the rollups, never the history.
    from prometheus_client import CollectorRegistry, generate_latest

    from promptq.metrics import PromptqCollector
    from promptq.periods import current_month
    from promptq.reports import usage_report
    from promptq.reports.dashboard import build_dashboard

    registry = CollectorRegistry()
    registry.register(PromptqCollector(url, None))
    assert b"promptq_jobs_created_total" in generate_latest(registry)
    with session_scope(url) as session:
        for group_by in ("model", "key", "day"):
            for scope in (key.id, None):
                usage_report(session, group_by, current_month(), scope)  # type: ignore[arg-type]
        build_dashboard(session, key.id)
        build_dashboard(session, None)
    # Retention: a page of a dry run, and a page of a real prune (a day's retention makes
    # half the history old enough).
    from promptq import retention

    daily = own.model_copy(update={"retention_days": 1})
    assert retention.prune(daily, dry_run=True, budget_seconds=0).jobs > 0
    assert retention.prune(daily, budget_seconds=0).jobs > 0


def _reads(statement: str) -> bool:
    return statement.lstrip().split(None, 1)[0].upper() in {"SELECT", "UPDATE", "DELETE", "WITH"}


def _sequential_reads(connection: Any, dialect: str, statement: str, parameters: Any) -> list[str]:
    """The lines of the statement's plan that read a history table whole."""
    if dialect == "postgresql":
        plan = [row[0] for row in connection.exec_driver_sql("EXPLAIN " + statement, parameters)]
        pattern = re.compile(rf"Seq Scan on ({'|'.join(HISTORY_TABLES)})\b")
        return [line for line in plan if pattern.search(line)]
    plan = [
        row[-1] for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
    ]
    pattern = re.compile(
        rf"^SCAN ({'|'.join(HISTORY_TABLES)})\b(?: USING (?:COVERING )?INDEX (\w+))?"
    )
    bad = []
    for line in plan:
        found = pattern.match(line)
        if found and found.group(2) not in PARTIAL_INDEXES:
            bad.append(line)
    return bad


def test_hot_paths_and_sweeper_passes_follow_the_work_in_flight(
    history: tuple[str, str], settings: Any, tmp_path: Path
) -> None:
    url, plain = history
    engine = get_engine(url)
    recorder = Recorder()
    event.listen(engine, "before_cursor_execute", recorder)
    try:
        _run_hot_paths(url, plain, settings)
    finally:
        event.remove(engine, "before_cursor_execute", recorder)
    checked = [(s, p) for s, p in recorder.statements if _reads(s)]
    # The paths above did run their queries (a recorder that saw nothing proves nothing).
    joined = "\n".join(s for s, _ in checked)
    for table in (
        "spend_ledger",
        "budget_reservations",
        "jobs",
        "webhook_deliveries",
        "usage_hourly",
        "attempt_hourly",
    ):
        assert table in joined, table
    assert len(checked) > 30
    found: dict[str, list[str]] = {}
    with engine.connect() as connection:
        # Deleting a subscription sets its deliveries' subscription_id to NULL: the foreign
        # key's own action, which no EXPLAIN of the DELETE shows; this is its statement.
        dialect = engine.dialect.name
        placeholder = "%(id)s" if dialect == "postgresql" else "?"
        unsubscribe = (
            f"UPDATE webhook_deliveries SET subscription_id = NULL "
            f"WHERE subscription_id = {placeholder}"
        )
        params: Any = {"id": "sub_x"} if dialect == "postgresql" else ("sub_x",)
        for statement, parameters in [*checked, (unsubscribe, params)]:
            bad = _sequential_reads(connection, dialect, statement, parameters)
            if bad:
                found[" ".join(statement.split())[:300]] = bad
        connection.rollback()
    assert found == {}
