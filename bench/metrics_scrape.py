"""promptq's /metrics: how long a scrape takes as history grows.

    .venv/bin/python bench/metrics_scrape.py                     # fresh PostgreSQL database
    .venv/bin/python bench/metrics_scrape.py --jobs 1000000 --sqlite

The figures are computed at scrape time from the database (see promptq/metrics.py), so a
scrape reads every job and attempt row. This fills a fresh database with --jobs finished
jobs (one attempt each, spread over five models and the final statuses) in a few bulk
statements, then times scrapes of one `promptq api` process. Progress goes to stderr;
stdout is Markdown, ready to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import requests
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, print_markdown, report_start
from _stack import (
    add_store_options,
    bench_engine,
    bench_run,
    create_api_key,
    log,
    stack_env,
    start_api,
    write_limits_file,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/7"
CHUNK = 50_000


def fill(engine, key_id: str, jobs: int, postgres: bool) -> None:  # type: ignore[no-untyped-def]
    """`jobs` finished jobs and their attempts, CHUNK rows per INSERT ... SELECT."""
    series = (
        "generate_series(:start, :stop - 1) AS n"
        if postgres
        else "(WITH RECURSIVE s(n) AS (SELECT :start UNION ALL SELECT n + 1 FROM s "
        "WHERE n + 1 < :stop) SELECT n FROM s)"
    )
    now = "now()" if postgres else "CURRENT_TIMESTAMP"
    job_sql = f"""
        INSERT INTO jobs (id, api_key_id, status, model, priority, request, attempts,
            max_attempts, created_at, updated_at, finished_at, input_tokens, output_tokens,
            cache_creation_input_tokens, cache_read_input_tokens, cost_input, cost_output,
            cost_cache_write, cost_cache_read, cost_total, webhook_attempts, result)
        SELECT 'job_bench_' || n, :key, CASE WHEN n % 20 = 0 THEN 'failed' ELSE 'succeeded' END,
            'claude-model-' || (n % 5), 'normal',
            '{{"model": "m", "max_tokens": 256, "messages": [{{"role": "user", "content":
              "Summarise the ticket in one line, please."}}]}}',
            1, 6, {now}, {now}, {now}, 200, 50, 0, 0, 600000000, 750000000, 0, 0,
            1350000000, 0,
            '{{"id": "msg", "type": "message", "content": [{{"type": "text", "text":
              "A one-line summary of the ticket, as a model would write it."}}]}}'
        FROM {series}
    """
    attempt_sql = f"""
        INSERT INTO attempts (job_id, number, started_at, finished_at, latency_ms, outcome,
            status_code)
        SELECT 'job_bench_' || n, 1, {now}, {now}, 200 + (n % 3000),
            CASE WHEN n % 20 = 0 THEN 'permanent' ELSE 'succeeded' END,
            CASE WHEN n % 20 = 0 THEN 400 ELSE 200 END
        FROM {series}
    """
    for start in range(0, jobs, CHUNK):
        stop = min(jobs, start + CHUNK)
        with engine.begin() as connection:
            params = {"start": start, "stop": stop, "key": key_id}
            connection.execute(text(job_sql), params)
            connection.execute(text(attempt_sql), params)
        log(f"{stop} jobs stored")
    if postgres:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE jobs"))
            connection.execute(text("VACUUM ANALYZE attempts"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000, help="jobs stored (1000000)")
    parser.add_argument("--scrapes", type=int, default=5, help="scrapes timed (5)")
    add_store_options(parser, DEFAULT_REDIS_URL, "flushed before and after the run")
    args = parser.parse_args()

    with bench_run(args, DEFAULT_REDIS_URL) as (stack, setup):
        env = stack_env(setup, write_limits_file(setup.workdir))
        _, api_url = start_api(stack, env, setup.workdir)
        key_id, _ = create_api_key(setup.database.url, "metrics-bench")
        engine = bench_engine(stack, setup.database.url)
        started = time.perf_counter()
        fill(engine, key_id, args.jobs, setup.database.kind == "PostgreSQL")
        log(f"stored in {time.perf_counter() - started:.0f} s")
        timings = []
        for _ in range(args.scrapes):
            started = time.perf_counter()
            response = requests.get(f"{api_url}/metrics", timeout=120)
            timings.append(time.perf_counter() - started)
            response.raise_for_status()
        lines = report_start("Metrics scrape", setup)
        lines += [
            f"{args.jobs:,} finished jobs and as many attempts in the database; one API "
            f"process; {args.scrapes} scrapes of `/metrics`.",
            "",
            markdown_table(
                ["Measure", "Result"],
                [
                    ["scrape: median", f"{statistics.median(timings) * 1000:.0f} ms"],
                    ["scrape: slowest", f"{max(timings) * 1000:.0f} ms"],
                    ["exposition size", f"{len(response.content) / 1024:.0f} KiB"],
                ],
            ),
        ]
        print_markdown(lines)
        return 0


if __name__ == "__main__":
    sys.exit(main())
