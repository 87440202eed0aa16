"""promptq Message Batches: how long creating a batch takes, and what streaming its results
costs the API in memory.

    .venv/bin/python bench/batch_create.py            # fresh PostgreSQL database, Redis db 10
    .venv/bin/python bench/batch_create.py --sqlite

One `promptq api` runs as a child process (no worker: creation is what is timed; the
batches' jobs stay queued). Each run POSTs a batch of --requests requests with the same
HTTP call the `anthropic` SDK makes and times it to the last byte of the answer. Then one
batch of --results-requests requests is marked finished in the database directly (running
100,000 requests through the simulator would measure the worker, not the results endpoint)
and its results are read as JSONL, while the API process's resident memory is sampled.
Progress goes to stderr; stdout is Markdown, ready to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
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

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/10"
MESSAGE = {
    "id": "msg_bench",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-6",
    "content": [{"type": "text", "text": "An answer of a few words, as a summary might be."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 20, "output_tokens": 12},
}


def batch_body(size: int, tag: str) -> bytes:
    return json.dumps(
        {
            "requests": [
                {
                    "custom_id": f"{tag}-{i}",
                    "params": {
                        "model": "claude-sonnet-4-6",
                        "max_tokens": 256,
                        "messages": [
                            {"role": "user", "content": f"Summarise ticket {i} in one line."}
                        ],
                    },
                }
                for i in range(size)
            ]
        }
    ).encode()


def create(api_url: str, key: str, body: bytes) -> tuple[float, dict]:
    headers = {"x-api-key": key, "content-type": "application/json"}
    started = time.perf_counter()
    response = requests.post(f"{api_url}/v1/messages/batches", data=body, headers=headers)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, response.json()


class MemorySampler:
    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="per batch (10000)")
    parser.add_argument("--runs", type=int, default=5, help="batches created (5)")
    parser.add_argument(
        "--results-requests", type=int, default=100_000, help="batch read back (100000)"
    )
    add_store_options(parser, DEFAULT_REDIS_URL, "flushed before and after the run")
    args = parser.parse_args()

    with bench_run(args, DEFAULT_REDIS_URL) as (stack, setup):
        env = stack_env(setup, write_limits_file(setup.workdir))
        api, api_url = start_api(stack, env, setup.workdir)
        _, key = create_api_key(setup.database.url, "batch-bench")
        create(api_url, key, batch_body(10, "warm"))

        timings = []
        for run in range(args.runs):
            body = batch_body(args.requests, f"r{run}")
            elapsed, batch = create(api_url, key, body)
            assert batch["request_counts"]["processing"] == args.requests, batch
            timings.append(elapsed)
            log(
                f"run {run + 1}: {args.requests} requests ({len(body) / 1e6:.1f} MB) "
                f"in {elapsed:.2f} s"
            )

        log(f"creating the {args.results_requests}-request batch to read back")
        body = batch_body(args.results_requests, "big")
        big_elapsed, big = create(api_url, key, body)
        engine = bench_engine(stack, setup.database.url)
        with engine.begin() as connection:
            connection.execute(
                text(
                    "UPDATE jobs SET status = 'succeeded', result = :result, "
                    "finished_at = created_at WHERE batch_id = :batch"
                ),
                {"result": json.dumps(MESSAGE), "batch": big["id"]},
            )
            connection.execute(
                text(
                    "UPDATE message_batches SET processing_status = 'ended', "
                    "ended_at = created_at WHERE id = :batch"
                ),
                {"batch": big["id"]},
            )
        rss_before = psutil.Process(api.pid).memory_info().rss
        sampler = MemorySampler(api.pid)
        started = time.perf_counter()
        lines = 0
        with requests.get(
            f"{api_url}/v1/messages/batches/{big['id']}/results",
            headers={"x-api-key": key},
            stream=True,
        ) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line:
                    lines += 1
        read_seconds = time.perf_counter() - started
        peak = sampler.stop()

        lines_out = report_start("Message Batches", setup)
        lines_out += [
            f"One API process, no worker. Creation timed from the request to the last byte of "
            f"the answer, {args.runs} batches of {args.requests:,} requests "
            f"({len(batch_body(args.requests, 'x')) / 1e6:.1f} MB each).",
            "",
            markdown_table(
                ["Measure", "Result"],
                [
                    [
                        f"create {args.requests:,} requests: median",
                        f"{statistics.median(timings):.2f} s",
                    ],
                    [
                        f"create {args.requests:,} requests: slowest",
                        f"{max(timings):.2f} s (target < 2 s)",
                    ],
                    [
                        f"create {args.results_requests:,} requests",
                        f"{big_elapsed:.2f} s ({len(body) / 1e6:.0f} MB)",
                    ],
                    [
                        f"results of {args.results_requests:,} requests, JSONL",
                        f"{lines:,} lines in {read_seconds:.2f} s",
                    ],
                    [
                        "API resident memory while streaming them",
                        f"{rss_before / 2**20:.0f} MiB before, peak {peak / 2**20:.0f} MiB",
                    ],
                ],
            ),
        ]
        print_markdown(lines_out)
        return 0 if lines == args.results_requests else 1


if __name__ == "__main__":
    sys.exit(main())
