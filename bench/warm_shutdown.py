"""promptq warm shutdown: SIGTERM to a worker holding 1,000 upstream calls in flight.

    .venv/bin/python bench/warm_shutdown.py            # fresh PostgreSQL database, Redis db 14
    .venv/bin/python bench/warm_shutdown.py --sqlite

One `promptq api` and one `promptq worker` (concurrency = --jobs) run as child processes;
the simulator answers every call after --latency seconds. --jobs jobs and the worker's
standby jobs (PROMPTQ_WORKER_STANDBY_JOBS, by default half as many more) are submitted; once
every call the worker may make is in flight at the simulator and the standby jobs are in
its hands, the worker gets SIGTERM, as a deployment's scale-down or rollout sends it.
Measured: how long the worker takes to exit; that every call it held was answered,
recorded and never made twice; and that the standby jobs were put back, untouched, their
messages on the broker again for the next worker (no second worker runs here). That time is
what deploy/'s stop grace periods must cover; with the upstream's own timeout it is at most
that timeout plus the recording.

Progress goes to stderr; stdout is Markdown, ready to paste into docs/benchmarks.md. Exit status 1
means a job was lost, failed or called twice.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, met, print_markdown, report_start
from _stack import (
    add_store_options,
    bench_engine,
    bench_run,
    create_api_key,
    log,
    stack_env,
    start_api,
    start_worker,
    submit_jobs,
    write_limits_file,
)

from promptq.broker.celery_app import create_celery
from promptq.broker.publish import broker_backlog
from promptq.config import Settings
from promptq.simulator import Simulator, SimulatorConfig

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000, help="calls in flight (default 1000)")
    parser.add_argument("--latency", type=float, default=10.0, help="upstream seconds (10)")
    add_store_options(parser, DEFAULT_REDIS_URL, "flushed before and after the run")
    parser.add_argument("--logs", type=Path, help="copy the API's and worker's logs here")
    args = parser.parse_args()

    with bench_run(args, DEFAULT_REDIS_URL, logs=args.logs) as (stack, setup):
        simulator = Simulator(SimulatorConfig(latency=args.latency))
        stack.callback(simulator.stop)
        env = stack_env(
            setup, write_limits_file(setup.workdir), {"PROMPTQ_UPSTREAM_URL": simulator.url}
        )
        _, api_url = start_api(stack, env, setup.workdir)
        worker = start_worker(stack, env, setup.workdir, args.jobs)
        simulator.start()
        # The worker's standby jobs (by default, or as given with --setting): its greenlets
        # beyond the calls. Said explicitly, so that this process's environment plays no part.
        given = setup.settings.get("PROMPTQ_WORKER_STANDBY_JOBS")
        standby = (
            Settings(
                worker_concurrency=args.jobs,
                worker_standby_jobs=int(given) if given else None,
            ).worker_greenlets
            - args.jobs
        )
        app = create_celery(Settings(redis_url=setup.redis.url))
        key_id, key = create_api_key(setup.database.url, "warm-shutdown")
        total = args.jobs + standby
        bodies = [json.dumps({"prompt": f"shutdown {i}"}).encode() for i in range(total)]
        log(f"submitting {args.jobs} jobs and {standby} standby jobs")
        submitted = submit_jobs(api_url, key, bodies, clients=8, deadline_seconds=120)
        # Every call in flight at once and the standby jobs taken: the worker holds all of
        # them when the signal comes.
        deadline = time.monotonic() + 60 + args.latency
        while simulator.stats()["in_flight"] < args.jobs or broker_backlog(app) > 0:
            worker.check_alive()
            if time.monotonic() > deadline:
                log(f"only {simulator.stats()['in_flight']} calls in flight; going on")
                break
            time.sleep(0.05)
        in_flight = simulator.stats()["in_flight"]
        log(f"SIGTERM with {in_flight} calls in flight")
        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=args.latency + 600)
        exit_seconds = time.monotonic() - signalled
        engine = bench_engine(stack, setup.database.url)
        with engine.connect() as connection:
            by_status = dict(
                connection.execute(
                    text("SELECT status, count(*) FROM jobs WHERE api_key_id = :key GROUP BY 1"),
                    {"key": key_id},
                ).all()
            )
        stats = simulator.stats()
        succeeded = int(by_status.get("succeeded", 0))
        queued = int(by_status.get("queued", 0))
        backlog = broker_backlog(app)
        ok = (
            submitted.accepted == total
            and succeeded == stats["calls"] == args.jobs
            and queued == backlog == standby
        )

        lines = report_start("Warm shutdown", setup)
        lines += [
            f"One worker (concurrency {args.jobs}, {standby} standby jobs) holding {in_flight} "
            f"upstream calls of {args.latency:g} s and its standby jobs gets SIGTERM; no other "
            "worker runs.",
            "",
            markdown_table(
                ["Measure", "Result", "Target", ""],
                [
                    ["Calls in flight at SIGTERM", str(in_flight), f"{args.jobs}", ""],
                    ["SIGTERM to the worker's exit", f"{exit_seconds:.1f} s", "", ""],
                    [
                        "Jobs succeeded / calls in flight at SIGTERM",
                        f"{succeeded} / {in_flight}",
                        "all",
                        met(succeeded == in_flight == args.jobs),
                    ],
                    [
                        "Standby jobs left queued / their messages back on the broker",
                        f"{queued} / {backlog}",
                        f"{standby} / {standby}",
                        met(queued == backlog == standby),
                    ],
                    [
                        "Upstream calls",
                        str(stats["calls"]),
                        f"{args.jobs}",
                        met(stats["calls"] == args.jobs),
                    ],
                ],
            ),
            "",
            f"Jobs by status: {dict(sorted(by_status.items()))}.",
        ]
        print_markdown(lines)
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
