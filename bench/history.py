"""Flat cost at any history: two identical running stacks, one on an empty database and one
on a database holding N finished jobs, measured in alternation in one run.

    .venv/bin/python bench/history.py --jobs 1000000 --redis-url redis://127.0.0.1:6379/9
    .venv/bin/python bench/history.py                       # the issue's 10,000,000 jobs

Each stack: one API process, one worker (the simulator as upstream, 50 ms per call), its
own PostgreSQL database and Redis database, and a key with a monthly budget. The history
is stored in bulk (INSERT ... SELECT, not through the API), the way the code leaves it:
jobs of the budgeted key and three others, ended over the past 90 days (so that about two
thirds are older than the 30-day retention), an attempt and a webhook delivery per job,
their hours in the rollups and their costs in the ledger. Measured on both, in --rounds
rounds that alternate which side goes first (so that whatever else the machine is doing
weighs on both sides alike): intake p50/p99 for the budgeted key, 100 of its jobs end to
end, a job read, a list page, `/metrics`, `/v1/usage` (the key's and the admin's, each
group_by), `/dashboard`, one sweeper pass (in this process, the real functions); then, on
the history side, a prune's throughput (rows/s, for --prune-seconds) and the database size
per stored job. Progress goes to stderr; stdout is Markdown, ready to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import text
from sqlalchemy.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, print_markdown, report_start
from _stack import (
    add_store_options,
    bench_engine,
    bench_run,
    flush_redis,
    log,
    percentile,
    provision_database,
    stack_env,
    start_api,
    start_worker,
    write_limits_file,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"
ADMIN_TOKEN = "pq-admin-history-bench-0123456789abcdef"
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
    # (The fraction first: (total - n) times 90 days overflows an interval at 10 million.)
    moment = f"now() - interval '{DAYS * 86400} seconds' * ((:total - n)::float8 / :total)"
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


@dataclass
class Side:
    """One of the two stacks, and every timing taken on it (seconds, by measure)."""

    name: str
    api: str
    plain: str
    engine: Engine
    settings: Any
    samples: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.plain}"}


def end_to_end(side: Side) -> float:
    """Seconds from the first of 100 submissions until the last of those jobs has ended."""
    started = time.perf_counter()
    batch = []
    for index in range(100):
        body = {"prompt": f"end to end {index} {time.time()}", "max_tokens": 16}
        response = requests.post(f"{side.api}/v1/jobs", json=body, headers=side.auth, timeout=60)
        response.raise_for_status()
        batch.append(response.json()["id"])
    while True:
        with side.engine.connect() as connection:
            left = connection.execute(
                text(
                    "SELECT COUNT(*) FROM jobs WHERE id = ANY(:ids) "
                    "AND status NOT IN ('succeeded', 'failed', 'canceled')"
                ),
                {"ids": batch},
            ).scalar_one()
        if left == 0:
            return time.perf_counter() - started
        if time.perf_counter() - started > 300:
            raise RuntimeError(f"{left} of the 100 jobs never ended")
        time.sleep(0.02)


def measure_round(side: Side, intake: int) -> None:
    """One round of every measure on one side, its timings added to the side's samples."""
    job_id = ""
    for index in range(intake):
        body = {"prompt": f"intake {index} {time.time()}", "max_tokens": 16}
        started = time.perf_counter()
        response = requests.post(f"{side.api}/v1/jobs", json=body, headers=side.auth, timeout=60)
        side.samples["intake"].append(time.perf_counter() - started)
        response.raise_for_status()
        job_id = response.json()["id"]
    side.samples["100 jobs end to end"].append(end_to_end(side))
    api, plain = side.api, side.plain
    side.samples["job read"] += timed(get(f"{api}/v1/jobs/{job_id}", plain), 10)
    side.samples["list page"] += timed(get(f"{api}/v1/jobs", plain, limit=20), 10)
    side.samples["/metrics"] += timed(
        lambda: requests.get(f"{api}/metrics", timeout=120).raise_for_status(), 3
    )
    for who, token in (("key", plain), ("admin", ADMIN_TOKEN)):
        for group_by in ("model", "key", "day"):
            side.samples[f"/v1/usage {who}, by {group_by}"] += timed(
                get(f"{api}/v1/usage", token, group_by=group_by), 3
            )
    for who, token in (("key", plain), ("admin", ADMIN_TOKEN)):
        side.samples[f"/dashboard ({who})"] += timed(get(f"{api}/dashboard", token), 3)
    side.samples["sweeper pass"] += timed(lambda: sweep_pass(side.settings), 3)


def figures(side: Side) -> dict[str, float]:
    """Each measure's median over every round (intake: its p50 and p99)."""
    result: dict[str, float] = {}
    for name, values in side.samples.items():
        if name == "intake":
            result["intake p50"] = statistics.median(values)
            result["intake p99"] = percentile(values, 99)
        else:
            result[name] = statistics.median(values)
    return result


def warm_up(side: Side) -> None:
    """A round of every request, not timed: the first measures would otherwise pay for cold
    connection pools and first-time imports."""
    for index in range(20):
        body = {"prompt": f"warm up {index} {time.time()}", "max_tokens": 16}
        requests.post(
            f"{side.api}/v1/jobs", json=body, headers=side.auth, timeout=60
        ).raise_for_status()
    get(f"{side.api}/v1/jobs", side.plain, limit=20)()
    requests.get(f"{side.api}/metrics", timeout=120).raise_for_status()
    for token in (side.plain, ADMIN_TOKEN):
        for group_by in ("model", "key", "day"):
            get(f"{side.api}/v1/usage", token, group_by=group_by)()
        get(f"{side.api}/dashboard", token)()
    sweep_pass(side.settings)


def sweep_pass(settings: Any) -> None:
    """What promptq.sweep does in the database (the Redis side is the same either way)."""
    from promptq.batches.service import expire_and_close
    from promptq.clock import utcnow
    from promptq.db import session_scope
    from promptq.jobs.backfill import backfill
    from promptq.jobs.sweeping import reclaim_expired, walk_stale
    from promptq.webhooks import deliveries

    with session_scope(settings) as session:
        reclaim_expired(session, settings)
    backfill(settings.database_url, budget_seconds=1.0)
    walk_stale(settings, None, lambda _page: None, budget_seconds=settings.sweep_budget_seconds)
    with session_scope(settings) as session:
        expire_and_close(session, settings)
    with session_scope(settings) as session:
        deliveries.due(session, utcnow() - timedelta(seconds=2))


def start_side(
    stack: contextlib.ExitStack,
    setup: Any,
    name: str,
    database_url: str,
    redis_url: str,
    upstream_url: str,
) -> Side:
    """A stack of its own (API, worker, budgeted key, three other keys) on the given stores."""
    from promptq.config import Settings

    workdir = setup.workdir / name
    workdir.mkdir()
    env = stack_env(
        setup,
        write_limits_file(workdir),
        {
            "PROMPTQ_DATABASE_URL": database_url,
            "PROMPTQ_REDIS_URL": redis_url,
            "PROMPTQ_UPSTREAM_URL": upstream_url,
            "PROMPTQ_ADMIN_TOKEN": ADMIN_TOKEN,
        },
    )
    _, plain = make_key(database_url, "budgeted", Decimal(1_000_000))
    for index in range(3):
        make_key(database_url, f"other {index}", None)
    _, api = start_api(stack, env, workdir, name=f"{name}-api")
    start_worker(stack, env, workdir, concurrency=32, name=f"{name}-worker")
    settings = Settings(database_url=database_url, redis_url=redis_url)
    return Side(name, api, plain, bench_engine(stack, database_url), settings)


def key_ids(engine: Engine) -> tuple[str, list[str]]:
    """The budgeted key's id and the others', as start_side made them."""
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT id, name FROM api_keys ORDER BY name")).all()
    budgeted = next(row.id for row in rows if row.name == "budgeted")
    return budgeted, [row.id for row in rows if row.name != "budgeted"]


def second_redis_url(url: str, stack: contextlib.ExitStack) -> str:
    """The next Redis database on the same server, flushed now and when the run ends."""
    base, _, number = url.rpartition("/")
    other = f"{base}/{(int(number or 0) + 1) % 16}"
    flush_redis(other)
    stack.callback(flush_redis, other)
    return other


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000_000, help="jobs stored (10000000)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of every measure on each side (5)"
    )
    parser.add_argument(
        "--intake", type=int, default=60, help="intake requests timed per round and side (60)"
    )
    parser.add_argument(
        "--prune-seconds", type=float, default=30.0, help="how long the prune runs (30)"
    )
    add_store_options(
        parser, DEFAULT_REDIS_URL, "flushed before and after the run (and the next database)"
    )
    args = parser.parse_args()
    if args.database_url or args.sqlite:
        parser.error("the history benchmark makes its own two PostgreSQL databases")

    from promptq.simulator import Simulator, SimulatorConfig

    with bench_run(args, DEFAULT_REDIS_URL) as (stack, setup):
        simulator = Simulator(SimulatorConfig(latency=0.05))
        stack.callback(simulator.stop)
        simulator.start()
        history_url = provision_database(stack, None, False, setup.workdir).url
        empty = start_side(
            stack, setup, "empty", setup.database.url, setup.redis.url, simulator.url
        )
        full = start_side(
            stack,
            setup,
            "history",
            history_url,
            second_redis_url(setup.redis.url, stack),
            simulator.url,
        )
        started = time.perf_counter()
        budgeted, others = key_ids(full.engine)
        fill(full.engine, budgeted, others, args.jobs)
        log(f"{args.jobs:,} jobs stored in {time.perf_counter() - started:.0f} s")

        for side in (empty, full):
            warm_up(side)
        for round_number in range(args.rounds):
            order = (empty, full) if round_number % 2 == 0 else (full, empty)
            for side in order:
                log(f"round {round_number + 1} of {args.rounds}: {side.name}")
                measure_round(side, args.intake)
        before, after = figures(empty), figures(full)

        with full.engine.connect() as connection:
            size = connection.execute(text("SELECT pg_database_size(current_database())"))
            stored = connection.execute(text("SELECT COUNT(*) FROM jobs")).scalar_one()
            per_job = size.scalar_one() / stored
        from promptq import retention

        prune = retention.prune(
            full.settings.model_copy(update={"retention_days": 30}),
            budget_seconds=args.prune_seconds,
        )
        log(prune.describe())

        rows = []
        for name, plain_figure in before.items():
            full_figure = after[name]
            rows.append(
                [
                    name,
                    f"{plain_figure * 1000:,.1f} ms",
                    f"{full_figure * 1000:,.1f} ms",
                    f"{full_figure / plain_figure:.2f}x" if plain_figure else "-",
                    f"{(full_figure - plain_figure) * 1000:+,.1f} ms",
                ]
            )
        lines = report_start("History", setup)
        lines += [
            f"Two identical stacks (one API process, one worker with 32 threads, the simulator "
            f"at 50 ms, a key with a monthly budget), one on an empty database and one on "
            f"{args.jobs:,} ended jobs (an attempt and a webhook delivery each, over 90 days, "
            f"their rollups and ledger rows), measured in {args.rounds} alternating rounds: "
            "medians of every round.",
            "",
            markdown_table(
                ["Measure", "empty database", f"{args.jobs:,} jobs", "ratio", "difference"],
                rows,
            ),
            "",
            f"Database size per stored job: {per_job:,.0f} bytes. Prune: {prune.describe()}.",
        ]
        print_markdown(lines)
        return 0


if __name__ == "__main__":
    sys.exit(main())
