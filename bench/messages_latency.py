"""promptq's POST /v1/messages: the time it adds to a call made with the `anthropic` SDK.

    .venv/bin/python bench/messages_latency.py          # fresh PostgreSQL database, Redis db 9
    .venv/bin/python bench/messages_latency.py --sqlite

One `promptq api` and one `promptq worker` run as child processes against the simulator,
which answers at once (latency 0), so each round trip is promptq's own cost: intake, the
queue, the worker's claim, the call, the record, and waking the request held open. Calls
are made one after another (--sequential) and then from --clients threads at once.
Progress goes to stderr; stdout is Markdown, ready to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import anthropic

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, print_markdown, report_start
from _stack import (
    add_store_options,
    bench_run,
    create_api_key,
    log,
    percentile,
    stack_env,
    start_api,
    start_worker,
    write_limits_file,
)

from promptq.simulator import Simulator, SimulatorConfig

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"
MODEL = "claude-sonnet-4-6"


def timed_call(client: anthropic.Anthropic, prompt: str) -> float:
    started = time.perf_counter()
    client.messages.create(
        model=MODEL, max_tokens=32, messages=[{"role": "user", "content": prompt}]
    )
    return time.perf_counter() - started


def concurrent_calls(client: anthropic.Anthropic, clients: int, per_client: int) -> list[float]:
    timings: list[float] = []
    lock = threading.Lock()

    def run(index: int) -> None:
        for n in range(per_client):
            elapsed = timed_call(client, f"client {index} call {n}")
            with lock:
                timings.append(elapsed)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return timings


def row(name: str, timings: list[float]) -> list[str]:
    return [
        name,
        str(len(timings)),
        f"{percentile(timings, 50) * 1000:.0f} ms",
        f"{percentile(timings, 95) * 1000:.0f} ms",
        f"{max(timings) * 1000:.0f} ms",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=100, help="calls in a row (100)")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (20)")
    parser.add_argument("--per-client", type=int, default=10, help="calls per client (10)")
    add_store_options(parser, DEFAULT_REDIS_URL, "flushed before and after the run")
    args = parser.parse_args()

    with bench_run(args, DEFAULT_REDIS_URL) as (stack, setup):
        simulator = Simulator(SimulatorConfig(latency=0)).start()
        stack.callback(simulator.stop)
        env = stack_env(
            setup, write_limits_file(setup.workdir), {"PROMPTQ_UPSTREAM_URL": simulator.url}
        )
        _, api_url = start_api(stack, env, setup.workdir)
        start_worker(stack, env, setup.workdir, concurrency=64)
        _, key = create_api_key(setup.database.url, "messages-latency")
        client = anthropic.Anthropic(api_key=key, base_url=api_url, max_retries=0)
        timed_call(client, "warm up")

        log(f"{args.sequential} calls in a row")
        sequential = [timed_call(client, f"call {n}") for n in range(args.sequential)]
        log(f"{args.clients} clients x {args.per_client} calls")
        concurrent = concurrent_calls(client, args.clients, args.per_client)

        lines = report_start("POST /v1/messages round trip", setup)
        lines += [
            "The `anthropic` SDK against one API and one worker (concurrency 64); the "
            "simulated upstream answers at once, so the round trip is promptq's own cost.",
            "",
            markdown_table(
                ["Calls", "n", "p50", "p95", "max"],
                [
                    row("one after another", sequential),
                    row(f"{args.clients} clients at once", concurrent),
                ],
            ),
        ]
        print_markdown(lines)
        return 0


if __name__ == "__main__":
    sys.exit(main())
