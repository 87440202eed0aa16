"""promptq's job path alone: the CPU one job costs a worker, without Celery, gevent or load.

    .venv/bin/python bench/job_path.py               # fresh PostgreSQL database, Redis db 8
    .venv/bin/python bench/job_path.py --jobs 3000 --profile

The jobs are stored as the API stores them, then run one after another in this process by
the worker's own JobRunner (worker.context: the Redis limiter, the lease keeper, the broker
messenger, the upstream client) against the simulator over HTTP, in a thread of its own.
What is measured is the CPU time of the thread that runs them (time.thread_time), so the
simulator's and the lease keeper's threads are not counted, in blocks of --block jobs.

Why apart from bench/throughput.py: on a shared machine the end-to-end runs vary by a
quarter from one hour to the next, more than most single changes to the job path are
worth. Here one process runs nothing else, and the fastest and the median block of a run
say what the code costs; alternate runs of two commits to compare them.

The baseline, in the same run: the round trips a job makes, made bare on the same
connections (two PostgreSQL statements, `SELECT 1` on a pooled connection; three Redis
PINGs; one call to the simulator through the same upstream client): the ratio says what
promptq adds around them. --profile prints cProfile's view of the jobs (thread CPU time,
with the profiler's own overhead, which inflates code of many small calls).

Progress goes to stderr; stdout is Markdown.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, print_markdown, report_start
from _stack import (
    add_store_options,
    bench_run,
    log,
    stack_env,
    write_limits_file,
)
from sqlalchemy import text

from promptq.simulator import Simulator, SimulatorConfig

if TYPE_CHECKING:
    from worker.context import WorkerContext

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/8"
WARM_UP_JOBS = 50


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs measured (default 2000)")
    parser.add_argument("--block", type=int, default=100, help="jobs per block (default 100)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top entries")
    add_store_options(parser, DEFAULT_REDIS_URL, "flushed before and after the run")
    args = parser.parse_args()

    with bench_run(args, DEFAULT_REDIS_URL) as (stack, setup):
        simulator = Simulator(SimulatorConfig(latency=0.0))
        simulator.start()
        stack.callback(simulator.stop)
        # This process is the worker: its settings come from the environment, as the
        # other benches' workers get theirs.
        os.environ.update(
            stack_env(
                setup, write_limits_file(setup.workdir), {"PROMPTQ_UPSTREAM_URL": simulator.url}
            )
        )
        from promptq.config import get_settings

        get_settings.cache_clear()
        from worker.context import worker_context

        context = worker_context()
        stack.callback(context.leases.stop)
        job_ids = store_jobs(args.jobs + WARM_UP_JOBS)
        log(f"stored {len(job_ids)} jobs; running {WARM_UP_JOBS} to warm up")
        for job_id in job_ids[:WARM_UP_JOBS]:
            run_one(context.runner.run, job_id)

        profile = cProfile.Profile(time.thread_time) if args.profile else None
        log(f"running {args.jobs} jobs in blocks of {args.block}")
        steps: list[Callable[[], None]] = [
            functools.partial(run_one, context.runner.run, job_id)
            for job_id in job_ids[WARM_UP_JOBS:]
        ]
        jobs = measure(steps, args.block, profile)
        log("the baseline: the same round trips, bare")
        baseline = measure([bare_round_trips(context)] * args.jobs, args.block, None)

        lines = report_start("Job path", setup)
        lines += [
            f"{args.jobs} jobs run one after another by the worker's JobRunner in this process "
            f"(simulator at 0 s, over HTTP), after {WARM_UP_JOBS} to warm up; CPU of the "
            f"running thread per job, by blocks of {args.block}. Baseline: the job's round "
            "trips made bare (2 x `SELECT 1`, 3 x Redis PING, 1 upstream call).",
            "",
            markdown_table(
                ["Per job", "Fastest block", "Median block", "Whole run", "Wall, whole run"],
                [
                    ["Job path", *jobs.row()],
                    ["Baseline", *baseline.row()],
                    [
                        "Job path / baseline",
                        f"{jobs.fastest / baseline.fastest:.2f}x",
                        f"{jobs.median / baseline.median:.2f}x",
                        f"{jobs.whole / baseline.whole:.2f}x",
                        "",
                    ],
                ],
            ),
        ]
        print_markdown(lines)
        if profile is not None:
            stats = pstats.Stats(profile, stream=sys.stdout)
            stats.sort_stats("cumulative").print_stats(40)
            stats.sort_stats("tottime").print_stats(25)
    return 0


class Blocks:
    def __init__(self, per_block: list[float], whole: float, wall: float) -> None:
        self.fastest = min(per_block)
        self.median = statistics.median(per_block)
        self.whole = whole
        self.wall = wall

    def row(self) -> list[str]:
        return [
            f"{self.fastest * 1000:.3f} ms",
            f"{self.median * 1000:.3f} ms",
            f"{self.whole * 1000:.3f} ms",
            f"{self.wall * 1000:.3f} ms",
        ]


def measure(
    steps: list[Callable[[], None]], block: int, profile: cProfile.Profile | None
) -> Blocks:
    per_block: list[float] = []
    started_cpu, started_wall = time.thread_time(), time.perf_counter()
    if profile is not None:
        profile.enable()
    for start in range(0, len(steps), block):
        chunk = steps[start : start + block]
        block_started = time.thread_time()
        for step in chunk:
            step()
        per_block.append((time.thread_time() - block_started) / len(chunk))
    if profile is not None:
        profile.disable()
    count = len(steps)
    return Blocks(
        per_block,
        (time.thread_time() - started_cpu) / count,
        (time.perf_counter() - started_wall) / count,
    )


def run_one(run: Callable[[str], str], job_id: str) -> None:
    outcome = run(job_id)
    if outcome != "succeeded":
        raise RuntimeError(f"job {job_id}: {outcome}")


def store_jobs(count: int) -> list[str]:
    """Jobs as the API stores them (their messages are never sent: this process runs them)."""
    from promptq.config import get_settings
    from promptq.db import session_scope
    from promptq.jobs import service
    from promptq.jobspec.schemas import JobCreate
    from promptq.keys.service import create_key
    from promptq.testing import SONNET

    settings = get_settings()
    with session_scope(settings) as session:
        key = create_key(session, "job-path").record
        return [
            service.create_job(
                session,
                settings,
                key,
                JobCreate.model_validate(
                    {"prompt": f"job path {number}", "model": SONNET, "max_tokens": 16}
                ),
            ).job.id
            for number in range(count)
        ]


def bare_round_trips(context: WorkerContext) -> Callable[[], None]:
    """The baseline's step: a job's round trips, each made bare."""
    from promptq.db import get_engine
    from promptq.redis_roles import client_for
    from promptq.testing import SONNET

    engine = get_engine(context.settings)
    limiter_redis = client_for(context.settings, "limiter")
    upstream = context.runner.upstream
    request = {
        "model": SONNET,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "baseline"}],
    }

    def round_trips() -> None:
        for _ in range(2):
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        for _ in range(3):
            limiter_redis.ping()
        upstream.create_message(request)

    return round_trips


if __name__ == "__main__":
    sys.exit(main())
