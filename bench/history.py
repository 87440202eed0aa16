"""Flat cost at any history: the same running stack measured on an empty database, then after
N finished jobs are stored, in one run.

    .venv/bin/python bench/history.py --jobs 1000000 --redis-url redis://127.0.0.1:6379/9
    .venv/bin/python bench/history.py                       # the issue's 10,000,000 jobs

One API process, one worker (the simulator as upstream, 50 ms per call) and a budgeted key.
The history is stored in bulk (INSERT ... SELECT, not through the API), the way the code
leaves it: jobs of the budgeted key and three others, ended over the past 90 days (so that
about two thirds are older than the 30-day retention), an attempt and a webhook delivery per
job, their hours in the rollups and their costs in the ledger. Measured before and after:
intake p50/p99 for the budgeted key, 100 of its jobs end to end, a job read, a list page,
`/metrics`, `/v1/usage` (the key's and the admin's, each group_by), `/dashboard`, one
sweeper pass (in this process, the real functions); after: a prune's throughput (rows/s,
for --prune-seconds) and the database size per stored job. Progress goes to stderr; stdout
is Markdown, ready to paste into the README.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, print_markdown, report_start
from _stack import (
    add_store_options,
    bench_engine,
    bench_run,
    log,
    percentile,
    stack_env,
    start_api,
    start_worker,
    write_limits_file,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"
ADMIN_TOKEN = "pq-admin-history-bench"
CHUNK = 100_000
DAYS = 90
MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1", "claude-sonnet-4-6")


def make_key(url: str, name: str, budget: Decimal | None) -> tuple[str, str]:
    from promptq.db import session_scope
    from promptq.keys.service import create_key

    with session_scope(url) as session:
        created = create_key(session, name, monthly_budget_usd=budget)
        return created.record.id, created.key


def fill(engine: Any, budgeted: str, others: list[str], jobs: int) -> None:
    """`jobs` ended jobs (one in four of the budgeted key), CHUNK per statement, then their
    rollups and ledger rows summed from them in SQL, as the recording code would have left
    them."""
    keys = [budgeted, *others]
    key_case = "CASE n % 4 " + " ".join(f"WHEN {i} THEN '{k}'" for i, k in enumerate(keys)) + " END"
    model_case = "CASE n % 4 " + " ".join(f"WHEN {i} THEN '{m}'" for i, m in enumerate(MODELS))
    model_case += " END"
    # Ended over the past DAYS, oldest first; ids older than any made now.
    moment = f"now() - ((:total - n) * interval '{DAYS * 86400} seconds' / :total)"
    job_sql = f"""
        INSERT INTO jobs (id, api_key_id, status, model, priority, request, attempts,
            max_attempts, created_at, updated_at, started_at, finished_at, input_tokens,
            output_tokens, cache_creation_input_tokens, cache_read_input_tokens, cost_input,
            cost_output, cost_cache_write, cost_cache_read, cost_total, webhook_attempts,
            webhook_url, webhook_status, result, output_text, accounted)
        SELECT 'job_00000' || lpad(n::text, 21, '0'), {key_case},
            CASE WHEN n % 20 = 0 THEN 'failed' ELSE 'succeeded' END, {model_case}, 'normal',
            '{{"model": "m", "max_tokens": 256, "messages": [{{"role": "user", "content":
              "Summarise the ticket in one line, please."}}]}}',
            1, 6, {moment}, {moment}, {moment}, {moment},
            200, 50, 0, 0,
            CASE WHEN n % 20 = 0 THEN NULL ELSE 600000000 END,
            CASE WHEN n % 20 = 0 THEN NULL ELSE 750000000 END,
            CASE WHEN n % 20 = 0 THEN NULL ELSE 0 END,
            CASE WHEN n % 20 = 0 THEN NULL ELSE 0 END,
            CASE WHEN n % 20 = 0 THEN NULL ELSE 1350000000 END,
            1, 'https://example.com/hook', 'succeeded',
            '{{"id": "msg", "type": "message", "content": [{{"type": "text", "text":
              "A one-line summary of the ticket, as a model would write it."}}]}}',
            'A one-line summary of the ticket, as a model would write it.', 1
        FROM generate_series(CAST(:start AS BIGINT), :stop - 1) AS n
    """
    attempt_sql = """
        INSERT INTO attempts (job_id, number, started_at, finished_at, latency_ms, outcome,
            status_code, accounted)
        SELECT id, 1, started_at, finished_at, 200 + CAST(substr(id, 20) AS INTEGER) % 3000,
            CASE WHEN status = 'failed' THEN 'permanent' ELSE 'succeeded' END,
            CASE WHEN status = 'failed' THEN 400 ELSE 200 END, 1
        FROM jobs WHERE id >= :low AND id < :high
    """
    delivery_sql = """
        INSERT INTO webhook_deliveries (id, event_id, job_id, api_key_id, url, event_type,
            body, status, attempts, created_at, finished_at)
        SELECT 'dlv_' || substr(id, 5), 'msg_' || substr(id, 5), id, api_key_id, webhook_url,
            'job.' || status, '{}', 'succeeded', 1, finished_at, finished_at
        FROM jobs WHERE id >= :low AND id < :high
    """
    for start in range(1, jobs + 1, CHUNK):
        stop = min(jobs + 1, start + CHUNK)
        bounds = {"low": f"job_00000{start:021d}", "high": f"job_00000{stop:021d}"}
        with engine.begin() as connection:
            connection.execute(text(job_sql), {"start": start, "stop": stop, "total": jobs})
            connection.execute(text(attempt_sql), bounds)
            connection.execute(text(delivery_sql), bounds)
        log(f"{stop - 1:,} jobs stored")
    hour = "date_trunc('hour', {0} AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
    with engine.begin() as connection:
        connection.execute(
            text(
                f"""
                INSERT INTO usage_hourly (hour, api_key_id, model, status, priced, jobs,
                    input_tokens, output_tokens, cache_creation_input_tokens,
                    cache_read_input_tokens, cost_total, cost_input, cost_output,
                    cost_cache_write, cost_cache_read)
                SELECT {hour.format("finished_at")}, api_key_id, model, status,
                    cost_total IS NOT NULL, COUNT(*), SUM(input_tokens), SUM(output_tokens),
                    SUM(cache_creation_input_tokens), SUM(cache_read_input_tokens),
                    COALESCE(SUM(cost_total), 0), COALESCE(SUM(cost_input), 0),
                    COALESCE(SUM(cost_output), 0), COALESCE(SUM(cost_cache_write), 0),
                    COALESCE(SUM(cost_cache_read), 0)
                FROM jobs WHERE id < 'job_00001' GROUP BY 1, 2, 3, 4, 5
                ON CONFLICT (hour, api_key_id, model, status, priced) DO UPDATE SET
                    jobs = usage_hourly.jobs + excluded.jobs,
                    cost_total = usage_hourly.cost_total + excluded.cost_total
                """
            )
        )
        from promptq.models import LATENCY_BUCKETS_MS

        buckets = ", ".join(
            f"SUM(CASE WHEN a.latency_ms <= {b} THEN 1 ELSE 0 END)" for b in LATENCY_BUCKETS_MS
        )
        connection.execute(
            text(
                f"""
                INSERT INTO attempt_hourly (hour, api_key_id, model, outcome, status_code,
                    attempts, latency_ms_sum,
                    {", ".join(f"le_{i}" for i in range(len(LATENCY_BUCKETS_MS)))})
                SELECT {hour.format("a.finished_at")}, j.api_key_id, j.model, a.outcome,
                    CAST(a.status_code AS VARCHAR), COUNT(*), SUM(a.latency_ms), {buckets}
                FROM attempts a JOIN jobs j ON j.id = a.job_id
                WHERE j.id < 'job_00001' GROUP BY 1, 2, 3, 4, 5
                ON CONFLICT (hour, api_key_id, model, outcome, status_code) DO UPDATE SET
                    attempts = attempt_hourly.attempts + excluded.attempts
                """
            )
        )
        connection.execute(
            text(
                """
                INSERT INTO spend_ledger (api_key_id, month, spent, jobs)
                SELECT api_key_id, to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM'),
                    SUM(cost_total), COUNT(*)
                FROM jobs WHERE id < 'job_00001' AND cost_total IS NOT NULL GROUP BY 1, 2
                ON CONFLICT (api_key_id, month) DO UPDATE SET
                    spent = spend_ledger.spent + excluded.spent,
                    jobs = spend_ledger.jobs + excluded.jobs
                """
            )
        )
    log("rollups and ledger written")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for table in ("jobs", "attempts", "webhook_deliveries", "usage_hourly", "attempt_hourly"):
            connection.execute(text(f"VACUUM ANALYZE {table}"))
        # The load's dirty pages written out now, not during the measures that follow (a
        # server that took a million rows in a minute is busy writing them for a while).
        connection.execute(text("CHECKPOINT"))


def timed(call: Callable[[], Any], times: int) -> list[float]:
    timings = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        timings.append(time.perf_counter() - started)
    return timings


def get(url: str, token: str, **params: Any) -> Callable[[], None]:
    def call() -> None:
        response = requests.get(
            url, params=params, headers={"Authorization": f"Bearer {token}"}, timeout=120
        )
        response.raise_for_status()

    return call


def measure(api: str, plain: str, engine: Any, settings: Any, args: argparse.Namespace) -> dict:
    """Every figure of one side (before or after), in seconds."""
    figures: dict[str, float] = {}
    auth = {"Authorization": f"Bearer {plain}"}
    intake = []
    ids = []
    for index in range(args.intake):
        body = {"prompt": f"intake {index} {time.time()}", "max_tokens": 16}
        started = time.perf_counter()
        response = requests.post(f"{api}/v1/jobs", json=body, headers=auth, timeout=60)
        intake.append(time.perf_counter() - started)
        response.raise_for_status()
        ids.append(response.json()["id"])
    figures["intake p50"] = statistics.median(intake)
    figures["intake p99"] = percentile(intake, 99)
    # 100 jobs end to end: submitted at once, until the last one has ended.
    started = time.perf_counter()
    batch = []
    for index in range(100):
        body = {"prompt": f"end to end {index} {time.time()}", "max_tokens": 16}
        response = requests.post(f"{api}/v1/jobs", json=body, headers=auth, timeout=60)
        response.raise_for_status()
        batch.append(response.json()["id"])
    while True:
        with engine.connect() as connection:
            left = connection.execute(
                text(
                    "SELECT COUNT(*) FROM jobs WHERE id = ANY(:ids) "
                    "AND status NOT IN ('succeeded', 'failed', 'canceled')"
                ),
                {"ids": batch},
            ).scalar_one()
        if left == 0:
            break
        if time.perf_counter() - started > 300:
            raise RuntimeError(f"{left} of the 100 jobs never ended")
        time.sleep(0.02)
    figures["100 jobs end to end"] = time.perf_counter() - started
    figures["job read"] = statistics.median(timed(get(f"{api}/v1/jobs/{ids[-1]}", plain), 30))
    figures["list page"] = statistics.median(timed(get(f"{api}/v1/jobs", plain, limit=20), 30))
    scrapes = timed(lambda: requests.get(f"{api}/metrics", timeout=120).raise_for_status(), 6)
    figures["/metrics"] = statistics.median(scrapes[1:])  # the first warms the closed hours
    for group_by in ("model", "key", "day"):
        figures[f"usage key {group_by}"] = statistics.median(
            timed(get(f"{api}/v1/usage", plain, group_by=group_by), 5)
        )
        figures[f"usage admin {group_by}"] = statistics.median(
            timed(get(f"{api}/v1/usage", ADMIN_TOKEN, group_by=group_by), 5)
        )
    figures["/dashboard (key)"] = statistics.median(timed(get(f"{api}/dashboard", plain), 5))
    figures["/dashboard (admin)"] = statistics.median(
        timed(get(f"{api}/dashboard", ADMIN_TOKEN), 5)
    )
    figures["sweeper pass"] = statistics.median(timed(lambda: sweep_pass(settings), 5))
    return figures


def warm_up(api: str, plain: str) -> None:
    """A round of every request, not timed: the first measures would otherwise pay for cold
    connection pools and first-time imports, and flatter the side measured second."""
    auth = {"Authorization": f"Bearer {plain}"}
    for index in range(20):
        body = {"prompt": f"warm up {index} {time.time()}", "max_tokens": 16}
        requests.post(f"{api}/v1/jobs", json=body, headers=auth, timeout=60).raise_for_status()
    get(f"{api}/v1/jobs", plain, limit=20)()
    requests.get(f"{api}/metrics", timeout=120).raise_for_status()
    for token in (plain, ADMIN_TOKEN):
        for group_by in ("model", "key", "day"):
            get(f"{api}/v1/usage", token, group_by=group_by)()
        get(f"{api}/dashboard", token)()


def sweep_pass(settings: Any) -> None:
    """What promptq.sweep does in the database (the Redis side is the same either way)."""
    from promptq.batches.service import expire_and_close
    from promptq.clock import utcnow
    from promptq.db import session_scope
    from promptq.jobs.backfill import backfill
    from promptq.jobs.sweeping import reclaim_expired, walk_stale
    from promptq.webhooks import deliveries

    with session_scope(settings.database_url) as session:
        reclaim_expired(session, settings)
    backfill(settings.database_url, budget_seconds=1.0)
    walk_stale(settings, None, lambda _page: None, budget_seconds=settings.sweep_budget_seconds)
    with session_scope(settings.database_url) as session:
        expire_and_close(session, settings)
    with session_scope(settings.database_url) as session:
        deliveries.due(session, utcnow() - timedelta(seconds=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000_000, help="jobs stored (10000000)")
    parser.add_argument("--intake", type=int, default=200, help="intake requests timed (200)")
    parser.add_argument(
        "--prune-seconds", type=float, default=30.0, help="how long the prune runs (30)"
    )
    add_store_options(parser, DEFAULT_REDIS_URL, "flushed before and after the run")
    args = parser.parse_args()

    from promptq.config import Settings
    from promptq.simulator import Simulator, SimulatorConfig

    with bench_run(args, DEFAULT_REDIS_URL) as (stack, setup):
        if setup.database.kind != "PostgreSQL":
            parser.error("the history benchmark fills PostgreSQL (generate_series)")
        simulator = Simulator(SimulatorConfig(latency=0.05))
        stack.callback(simulator.stop)
        simulator.start()
        env = stack_env(
            setup,
            write_limits_file(setup.workdir),
            {"PROMPTQ_UPSTREAM_URL": simulator.url, "PROMPTQ_ADMIN_TOKEN": ADMIN_TOKEN},
        )
        url = setup.database.url
        settings = Settings(database_url=url, redis_url=setup.redis.url)
        budgeted, plain = make_key(url, "budgeted", Decimal(1_000_000))
        others = [make_key(url, f"other {i}", None)[0] for i in range(3)]
        _, api = start_api(stack, env, setup.workdir)
        start_worker(stack, env, setup.workdir, concurrency=32)
        engine = bench_engine(stack, url)

        warm_up(api, plain)
        log("measuring on the empty database")
        before = measure(api, plain, engine, settings, args)
        started = time.perf_counter()
        fill(engine, budgeted, others, args.jobs)
        log(f"{args.jobs:,} jobs stored in {time.perf_counter() - started:.0f} s")
        log("measuring with the history")
        after = measure(api, plain, engine, settings, args)

        with engine.connect() as connection:
            size = connection.execute(text("SELECT pg_database_size(current_database())"))
            stored = connection.execute(text("SELECT COUNT(*) FROM jobs")).scalar_one()
            per_job = size.scalar_one() / stored
        from promptq import retention

        prune = retention.prune(
            settings.model_copy(update={"retention_days": 30}),
            budget_seconds=args.prune_seconds,
        )
        log(prune.describe())

        rows = []
        for name, empty in before.items():
            full = after[name]
            rows.append(
                [
                    name,
                    f"{empty * 1000:,.0f} ms",
                    f"{full * 1000:,.0f} ms",
                    f"{full / empty:.2f}x" if empty else "-",
                ]
            )
        lines = report_start("History", setup)
        lines += [
            f"One API process, one worker (32 threads), the simulator at 50 ms; a key with a "
            f"monthly budget. After: {args.jobs:,} ended jobs stored (with an attempt and a "
            "webhook delivery each, over 90 days), their rollups and ledger rows.",
            "",
            markdown_table(["Measure", "empty database", f"{args.jobs:,} jobs", "ratio"], rows),
            "",
            f"Database size per stored job: {per_job:,.0f} bytes. Prune: {prune.describe()}.",
        ]
        print_markdown(lines)
        return 0


if __name__ == "__main__":
    sys.exit(main())
