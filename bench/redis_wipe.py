"""After a Redis wipe, how long until every queued job has a message again.

    .venv/bin/python bench/redis_wipe.py --redis-url redis://127.0.0.1:6379/9
    .venv/bin/python bench/redis_wipe.py --jobs 100000      # the issue's figure (default)

A running stack (one worker, `promptq beat`, the simulator as upstream) and N jobs queued in
the database, stored in bulk as intake leaves them (created over the past ten minutes, so
all are older than republish_after_seconds). Then the broker's Redis is wiped (FLUSHDB):
every message, publish marker and rate-limit queue is gone, and only the sweeper can bring
the jobs back. Measured: seconds from the wipe until no job is left queued without a
message (a job counts as covered once its publish marker is back or a worker has claimed
it), with the covered count every few seconds. Progress goes to stderr; stdout is Markdown.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, print_markdown, report_start
from _stack import (
    add_store_options,
    bench_engine,
    bench_run,
    create_api_key,
    flush_redis,
    log,
    stack_env,
    start_beat,
    start_worker,
    write_limits_file,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"
CHUNK = 50_000
POLL_SECONDS = 1.0


def store_queued_jobs(engine: Engine, key_id: str, jobs: int) -> None:
    """`jobs` queued jobs, created over the past ten minutes, oldest first (ids in that
    order, as ULIDs would be)."""
    sql = """
        INSERT INTO jobs (id, api_key_id, status, model, priority, request, attempts,
            max_attempts, created_at, updated_at, webhook_attempts, accounted)
        SELECT 'job_wipe' || lpad(n::text, 22, '0'), :key, 'queued', 'claude-sonnet-4-5',
            'normal',
            '{"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user",
              "content": "Summarise the ticket in one line, please."}]}',
            0, 6,
            now() - interval '600 seconds' * ((:total - n)::float8 / :total)
                - interval '60 seconds',
            now() - interval '600 seconds' * ((:total - n)::float8 / :total)
                - interval '60 seconds',
            0, 0
        FROM generate_series(CAST(:start AS BIGINT), :stop - 1) AS n
    """
    for start in range(1, jobs + 1, CHUNK):
        stop = min(jobs + 1, start + CHUNK)
        with engine.begin() as connection:
            connection.execute(
                text(sql), {"key": key_id, "start": start, "stop": stop, "total": jobs}
            )
    with engine.begin() as connection:
        connection.execute(text("ANALYZE jobs"))


def uncovered(engine: Engine, client: redis.Redis) -> int:
    """Jobs still queued whose publish marker is missing: nothing in Redis would run them."""
    from promptq.redis_keys import published_marker

    with engine.connect() as connection:
        ids = connection.execute(text("SELECT id FROM jobs WHERE status = 'queued'")).scalars()
        ids = list(ids)
    missing = 0
    for start in range(0, len(ids), 10_000):
        chunk = ids[start : start + 10_000]
        with client.pipeline(transaction=False) as pipe:
            for job_id in chunk:
                pipe.exists(published_marker(job_id))
            missing += sum(1 for found in pipe.execute() if not found)
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs queued (100000)")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="give up after this many seconds (600)"
    )
    add_store_options(parser, DEFAULT_REDIS_URL, "the broker; wiped during the run")
    args = parser.parse_args()

    from promptq.config import Settings
    from promptq.simulator import Simulator, SimulatorConfig

    with bench_run(args, DEFAULT_REDIS_URL) as (stack, setup):
        if setup.database.kind != "PostgreSQL":
            parser.error("the wipe benchmark fills PostgreSQL (generate_series)")
        # Slow answers: the worker keeps few jobs moving, so what is measured is the
        # sweeper bringing the messages back, not the worker running the jobs.
        simulator = Simulator(SimulatorConfig(latency=5.0))
        stack.callback(simulator.stop)
        simulator.start()
        env = stack_env(
            setup, write_limits_file(setup.workdir), {"PROMPTQ_UPSTREAM_URL": simulator.url}
        )
        settings = Settings(database_url=setup.database.url, redis_url=setup.redis.url)
        key_id, _ = create_api_key(setup.database.url, "wipe")
        engine = bench_engine(stack, setup.database.url)
        start_worker(stack, env, setup.workdir, concurrency=8)
        start_beat(stack, env, setup.workdir)

        started = time.perf_counter()
        store_queued_jobs(engine, key_id, args.jobs)
        log(f"{args.jobs:,} queued jobs stored in {time.perf_counter() - started:.1f} s")
        flush_redis(setup.redis.url)
        wiped = time.perf_counter()
        log("Redis wiped")
        client = redis.Redis.from_url(setup.redis.url)
        stack.callback(client.close)
        progress: list[list[str]] = []
        last_logged = -10.0
        while True:
            left = uncovered(engine, client)
            elapsed = time.perf_counter() - wiped
            if elapsed - last_logged >= 5 or left == 0:
                log(f"{elapsed:5.1f} s: {args.jobs - left:,} of {args.jobs:,} covered")
                progress.append([f"{elapsed:.0f} s", f"{args.jobs - left:,}"])
                last_logged = elapsed
            if left == 0:
                break
            if elapsed > args.timeout:
                raise RuntimeError(f"{left:,} jobs still had no message after {elapsed:.0f} s")
            time.sleep(POLL_SECONDS)

        lines = report_start("Redis wipe", setup)
        lines += [
            f"{args.jobs:,} jobs queued (created 1 to 11 minutes earlier), one worker "
            f"(8 threads), `promptq beat` with its defaults (a pass every "
            f"{settings.sweep_interval_seconds:g} s, each at most "
            f"{settings.sweep_budget_seconds:g} s); the broker's Redis wiped.",
            "",
            f"**Every job had a message again {elapsed:.1f} s after the wipe.**",
            "",
            markdown_table(["after the wipe", "jobs with a message again"], progress),
        ]
        print_markdown(lines)
        return 0


if __name__ == "__main__":
    sys.exit(main())
