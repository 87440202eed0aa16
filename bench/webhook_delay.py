"""promptq webhooks: the delay from a job finishing to its first delivery arriving.

    .venv/bin/python bench/webhook_delay.py            # fresh PostgreSQL database, Redis db 11
    .venv/bin/python bench/webhook_delay.py --sqlite

One `promptq api` and one `promptq worker` run as child processes against the simulator;
a receiver on 127.0.0.1 notes when each job's `job.succeeded` arrives. The delay of a job
is that arrival time less the time its answer came, its last attempt's `finished_at` (same
machine, same clock): the wait for the record counts. Progress goes to stderr; stdout is
Markdown, ready to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, print_markdown, report_start
from _stack import (
    add_store_options,
    bench_engine,
    bench_run,
    create_api_key,
    epoch,
    log,
    percentile,
    stack_env,
    start_api,
    start_worker,
    submit_jobs,
    write_limits_file,
)

from promptq.simulator import Simulator, SimulatorConfig

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/11"


class Receiver:
    """Notes the arrival time of each job's first delivery, in a process of its own: in this
    one, busy with the simulator's threads and the submitting clients, a POST would wait
    for the GIL before its arrival were noted, and the bench's own load counted as delay."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.arrivals: dict[str, float] = {}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-receiver"],
            stdin=subprocess.PIPE,  # its end tells the receiver the bench is gone
            stdout=subprocess.PIPE,
            text=True,
        )
        stack.callback(self.process.wait, 10)
        stack.callback(self.process.terminate)
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            job_id, arrived = line.split()
            self.arrivals.setdefault(job_id, float(arrived))


def serve_receiver() -> None:
    """The receiver's process: prints its URL, then `JOB_ID ARRIVAL` for every POST."""

    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            arrived = time.time()
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            job_id = json.loads(body)["data"]["id"]
            self.send_response(204)
            self.end_headers()
            with lock:  # one whole line at a time: print() writes its parts one by one
                sys.stdout.write(f"{job_id} {arrived:.6f}\n")
                sys.stdout.flush()

        def log_message(self, *_: Any) -> None:
            pass

    def exit_with_the_bench() -> None:
        sys.stdin.read()
        os._exit(0)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        # socketserver's backlog of 5 drops the connects of a burst beyond it, which the
        # sender retries only a second later: that second would be counted as delay.
        request_queue_size = 128

    threading.Thread(target=exit_with_the_bench, daemon=True).start()
    server = Server(("127.0.0.1", 0), Handler)
    print(f"http://127.0.0.1:{server.server_address[1]}/hook", flush=True)
    server.serve_forever()


def _p50_p95(values: list[float]) -> str:
    return f"{percentile(values, 50) * 1000:.0f} / {percentile(values, 95) * 1000:.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs (default 200)")
    parser.add_argument("--latency", type=float, default=0.2, help="upstream seconds (0.2)")
    parser.add_argument("--concurrency", type=int, default=32, help="worker threads (32)")
    add_store_options(parser, DEFAULT_REDIS_URL, "flushed before and after the run")
    args = parser.parse_args()

    with bench_run(args, DEFAULT_REDIS_URL) as (stack, setup):
        simulator = Simulator(SimulatorConfig(latency=args.latency)).start()
        stack.callback(simulator.stop)
        receiver = Receiver(stack)
        env = stack_env(
            setup,
            write_limits_file(setup.workdir),
            {
                "PROMPTQ_UPSTREAM_URL": simulator.url,
                "PROMPTQ_WEBHOOK_ALLOW_PRIVATE": "true",
            },
        )
        _, api_url = start_api(stack, env, setup.workdir)
        start_worker(stack, env, setup.workdir, args.concurrency)
        key_id, key = create_api_key(setup.database.url, "webhook-delay")
        bodies = [
            json.dumps({"prompt": f"delay {i}", "webhook_url": receiver.url}).encode()
            for i in range(args.jobs)
        ]
        log(f"submitting {args.jobs} jobs with a webhook_url")
        submitted = submit_jobs(api_url, key, bodies, clients=4, deadline_seconds=120)
        deadline = time.monotonic() + 120
        while len(receiver.arrivals) < submitted.accepted and time.monotonic() < deadline:
            time.sleep(0.2)
        engine = bench_engine(stack, setup.database.url)
        with engine.connect() as connection:
            # The job's end is its answer: its last upstream call's finished_at (the job's
            # own is when that answer was recorded, which may have waited its turn). The
            # first delivery attempt's start splits the delay: the wait for a sender to
            # take the delivery, then the POST itself.
            rows = connection.execute(
                text(
                    "SELECT j.id, MAX(c.finished_at), MIN(a.started_at) FROM jobs j"
                    " JOIN attempts c ON c.job_id = j.id"
                    " LEFT JOIN webhook_deliveries d ON d.job_id = j.id"
                    " LEFT JOIN webhook_attempts a ON a.delivery_id = d.id AND a.number = 1"
                    " WHERE j.api_key_id = :key AND j.finished_at IS NOT NULL GROUP BY j.id"
                ),
                {"key": key_id},
            ).all()
        answered_at = sorted(epoch(answered) for _, answered, _ in rows)
        # The pace of the jobs' ends: the deliveries' load, and what the worker did besides.
        ended_per_second = (len(answered_at) - 1) / max(answered_at[-1] - answered_at[0], 1e-9)
        delays, waits, posts = [], [], []
        for job_id, answered, started in rows:
            if job_id not in receiver.arrivals:
                continue
            delays.append(receiver.arrivals[job_id] - epoch(answered))
            if started is not None:
                waits.append(epoch(started) - epoch(answered))
                posts.append(receiver.arrivals[job_id] - epoch(started))
        lines = report_start("Webhook delivery delay", setup)
        lines += [
            f"{submitted.accepted} jobs with a `webhook_url`, one API, one worker (concurrency "
            f"{args.concurrency}), simulated upstream {args.latency} s; delay = first delivery's "
            "arrival at a receiver on 127.0.0.1 minus the answer that ended the job (its "
            "last attempt's `finished_at`).",
            "",
            markdown_table(
                ["Measure", "Result"],
                [
                    ["Deliveries received / jobs", f"{len(delays)} / {submitted.accepted}"],
                    ["Jobs ended per second (first to last end)", f"{ended_per_second:.0f}"],
                    ["p50", f"{percentile(delays, 50) * 1000:.0f} ms"],
                    ["p95", f"{percentile(delays, 95) * 1000:.0f} ms"],
                    ["max", f"{max(delays, default=float('nan')) * 1000:.0f} ms"],
                    ["job end to first POST, p50 / p95", _p50_p95(waits)],
                    ["first POST to arrival, p50 / p95", _p50_p95(posts)],
                ],
            ),
        ]
        print_markdown(lines)
        return 0 if len(delays) == submitted.accepted == args.jobs else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve-receiver"]:
        serve_receiver()
    else:
        sys.exit(main())
