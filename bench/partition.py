"""promptq through network partitions: two hosts, and host A cut from Redis, then from
PostgreSQL, then from both, while jobs run.

    flock /tmp/bench.lock .venv/bin/python bench/partition.py       # as root
    .venv/bin/python bench/partition.py --jobs 300 --cut-seconds 10 --logs /tmp/partition-logs

Two hosts are network namespaces made for the run (promptq.netns: loopback-range addresses
only, 127.77.N.2, this machine at 127.77.N.1), each running one `promptq api` and one
`promptq worker` (gevent, `--concurrency`); host B also runs `promptq beat`. PostgreSQL and
Redis stay on this machine and each host reaches them through socat forwards on its own
link; each host has its own upstream simulator (`--latency` +- `--jitter` s a call), which
counts its calls, so that the calls in flight on host A are known at any moment. Leases and
sweeps are short (claim 10 s, slot 5 s, a sweep every 2 s), as in bench/chaos.py.

Three cuts, one after the other, each with `--jobs`/3 jobs of its own: the jobs are
submitted at an even pace over `--before` + `--cut-seconds` + `--after` seconds, and the cut
starts `--before` seconds in. A cut drops the packets of the forwarded service on host A's
link, both ways: A's open connections to it hang and its new ones time out, while its other
traffic, and host B, go on. Clients send each job with an Idempotency-Key, alternately to
either host's API first, and resend it to the other after a refusal, an error or no answer
within 5 s, as clients behind a load balancer do. The cut ends, then every job of the cut is
waited for before the next cut begins.

Measured for each cut:
- lost: accepted jobs (a 2xx received) that did not end `succeeded`;
- duplicate upstream calls: both simulators' calls for the cut's prompts beyond one per
  job; their bound is the calls in flight on host A when the cut began;
- finished after the heal: from the moment the link came back until the last of the cut's
  jobs finished (its `finished_at`), target 60 s.

Everything started here is stopped, the hosts taken down and the fresh database dropped,
however the run ends. Only loopback-range addresses are contacted. Needs root (network
namespaces), `ip`, `tc` and `socat`. Exit status 1 means a job was lost. Progress goes to
stderr; stdout is Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, met, print_markdown, report_start
from _stack import (
    FAST_RECOVERY_SETTINGS,
    Setup,
    add_store_options,
    bench_run,
    create_api_key,
    epoch,
    log,
    settings_text,
    stack_env,
    start_api,
    start_beat,
    start_worker,
    task_errors,
    write_limits_file,
)

from promptq import netns
from promptq.simulator import Simulator
from promptq.supervisor import Child
from promptq.testing import FINAL

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
API_PORT = 8000  # each host is a namespace of its own: the same port on both
CLIENT_TIMEOUT_SECONDS = 5.0
CLIENTS = 24
TARGET_FINISHED_AFTER_HEAL_SECONDS = 60.0
# How long the jobs of a cut are waited for after its heal before they count as lost.
WAIT_AFTER_HEAL_SECONDS = 180.0


@dataclass
class Host:
    label: str
    host: netns.Host
    simulator: Simulator
    api_url: str = ""
    children: list[Child] = field(default_factory=list)


@dataclass
class CutResult:
    label: str
    jobs: int
    accepted: int = 0
    lost: int = 0
    unfinished: int = 0
    duplicate_calls: int = 0
    in_flight_on_a: int = 0
    calls_on_a_during_cut: int = 0
    finished_after_heal: float = float("nan")
    resent: Counter[str] = field(default_factory=Counter)  # why a client resent
    accepted_by: Counter[str] = field(default_factory=Counter)  # which host's API took it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs in all, split over 3 cuts")
    parser.add_argument("--cut-seconds", type=float, default=20.0)
    parser.add_argument("--before", type=float, default=5.0, help="submitting before a cut")
    parser.add_argument("--after", type=float, default=5.0, help="submitting after a heal")
    parser.add_argument("--concurrency", type=int, default=32, help="each host's worker")
    parser.add_argument("--latency", type=float, default=1.0, help="upstream seconds a call")
    parser.add_argument("--jitter", type=float, default=0.5)
    parser.add_argument("--logs", type=Path, help="copy the processes' logs here")
    add_store_options(parser, DEFAULT_REDIS_URL, "the Redis (flushed before and after)")
    args = parser.parse_args(argv)
    if args.sqlite:
        parser.error("two hosts share one database server: PostgreSQL only")
    if args.jobs < 3:
        parser.error("--jobs must be at least 3")
    return args


def _forwarded(url: str, host: netns.Host, default_port: int) -> tuple[str, int]:
    """`url` as host sees it through its forward, and the forwarded port."""
    if url.startswith("redis"):
        parts = urlsplit(url)
        port = parts.port or default_port
        return parts._replace(netloc=f"{host.gateway}:{port}").geturl(), port
    parsed = make_url(url)
    port = parsed.port or default_port
    return parsed.set(host=host.gateway).render_as_string(hide_password=False), port


def start_hosts(
    args: argparse.Namespace, stack: contextlib.ExitStack, setup: Setup
) -> tuple[list[Host], int, int]:
    """Both hosts with their processes; (the hosts, Redis's port, PostgreSQL's port)."""
    made = netns.hosts(["a", "b"])
    for host in made:
        stack.callback(host.down)
    log(", ".join(f"host {h.namespace} at {h.address}" for h in made))
    limits = write_limits_file(setup.workdir)
    hosts: list[Host] = []
    redis_port = database_port = 0
    for label, host in zip("ab", made, strict=True):
        simulator = Simulator(host=host.gateway).start()
        stack.callback(simulator.stop)
        simulator.configure(latency=args.latency, latency_jitter=args.jitter)
        redis_url, redis_port = _forwarded(setup.redis.url, host, 6379)
        database_url, database_port = _forwarded(setup.database.url, host, 5432)
        host.forward(redis_port)
        host.forward(database_port)
        env = stack_env(
            setup,
            limits,
            {
                **FAST_RECOVERY_SETTINGS,
                "PROMPTQ_DATABASE_URL": database_url,
                "PROMPTQ_REDIS_URL": redis_url,
                "PROMPTQ_UPSTREAM_URL": simulator.url,
            },
        )
        entry = Host(label, host, simulator)
        api, entry.api_url = start_api(
            stack,
            env,
            setup.workdir,
            port=API_PORT,
            name=f"api-{label}",
            host=host.address,
            prefix=host.prefix,
        )
        worker = start_worker(
            stack, env, setup.workdir, args.concurrency, name=f"worker-{label}", prefix=host.prefix
        )
        entry.children += [api, worker]
        if label == "b":  # the sweeper on the host that is never cut
            entry.children.append(start_beat(stack, env, setup.workdir, prefix=host.prefix))
        hosts.append(entry)
    return hosts, redis_port, database_port


def through_a_cut(
    args: argparse.Namespace,
    hosts: list[Host],
    key: str,
    label: str,
    ports: list[int],
    jobs: int,
    run_id: str,
) -> CutResult:
    a = hosts[0]
    result = CutResult(label, jobs)
    texts = [f"partition {run_id} {label} job {i:05d}: name three rivers." for i in range(jobs)]
    ids: dict[int, str] = {}
    lock = threading.Lock()
    window = args.before + args.cut_seconds + args.after
    started = time.monotonic()

    def submit(index: int) -> None:
        time.sleep(max(0.0, started + window * index / jobs - time.monotonic()))
        attempt = index
        deadline = time.monotonic() + window + WAIT_AFTER_HEAL_SECONDS
        with requests.Session() as http:
            while time.monotonic() < deadline:
                target = hosts[attempt % 2]
                attempt += 1
                try:
                    response = http.post(
                        f"{target.api_url}/v1/jobs",
                        json={"prompt": texts[index]},
                        headers={"x-api-key": key, "Idempotency-Key": texts[index]},
                        timeout=CLIENT_TIMEOUT_SECONDS,
                    )
                except requests.RequestException as exc:
                    reason = f"{target.label}: {type(exc).__name__}"
                else:
                    if response.status_code in (200, 202):
                        with lock:
                            ids[index] = str(response.json()["id"])
                            result.accepted_by[target.label] += 1
                        return
                    reason = f"{target.label}: {response.status_code}"
                with lock:
                    result.resent[reason] += 1
                time.sleep(0.2)

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(submit, index) for index in range(jobs)]
        time.sleep(args.before)
        before = a.simulator.stats()
        result.in_flight_on_a = int(before["in_flight"])
        log(f"cut {label}: host A cut ({result.in_flight_on_a} calls in flight on A)")
        a.host.cut(*ports)
        try:
            time.sleep(args.cut_seconds)
        finally:
            a.host.heal(*ports)
        healed_at = time.time()
        result.calls_on_a_during_cut = int(a.simulator.stats()["calls"]) - int(before["calls"])
        log(f"cut {label}: healed")
        for future in futures:
            future.result()
    result.accepted = len(ids)
    finished = _wait_for_jobs(hosts[1].api_url, key, list(ids.values()), healed_at)
    succeeded = [job for job in finished if job["status"] == "succeeded"]
    result.lost = result.accepted - len(succeeded)
    result.unfinished = result.accepted - len(finished)
    if finished:
        last = max(epoch(job["finished_at"]) for job in finished)
        result.finished_after_heal = last - healed_at
    calls = Counter[str]()
    for host in hosts:
        by_prompt = host.simulator.stats()["calls_by_prompt"]
        for text in texts:
            calls[text] += int(by_prompt.get(text[:60], 0))
    result.duplicate_calls = sum(n - 1 for n in calls.values() if n > 1)
    log(f"cut {label}: {result}")
    return result


def _wait_for_jobs(
    api_url: str, key: str, job_ids: list[str], healed_at: float
) -> list[dict[str, Any]]:
    """The jobs that reached a final status by WAIT_AFTER_HEAL_SECONDS after the heal."""
    pending = set(job_ids)
    done: list[dict[str, Any]] = []
    with requests.Session() as http:
        while pending and time.time() < healed_at + WAIT_AFTER_HEAL_SECONDS:
            for job_id in sorted(pending):
                try:
                    job = http.get(
                        f"{api_url}/v1/jobs/{job_id}", headers={"x-api-key": key}, timeout=10
                    ).json()
                except requests.RequestException:
                    continue
                if job.get("status") in FINAL:
                    done.append(job)
                    pending.discard(job_id)
            if pending:
                time.sleep(0.5)
    return done


def run(args: argparse.Namespace, stack: contextlib.ExitStack, setup: Setup) -> list[CutResult]:
    hosts, redis_port, database_port = start_hosts(args, stack, setup)
    _, key = create_api_key(setup.database.url, "partition")
    run_id = uuid.uuid4().hex[:8]
    cuts = [("Redis", [redis_port]), ("PostgreSQL", [database_port])]
    cuts.append(("both", [redis_port, database_port]))
    shares = [args.jobs // 3 + (1 if i < args.jobs % 3 else 0) for i in range(3)]
    results = [
        through_a_cut(args, hosts, key, label, ports, jobs, run_id)
        for (label, ports), jobs in zip(cuts, shares, strict=True)
    ]
    errors = task_errors([child for host in hosts for child in host.children])
    if errors:
        log(f"{len(errors)} task errors, e.g. {errors[0][:300]}")
    return results


def print_report(
    args: argparse.Namespace, setup: Setup, results: list[CutResult], seconds: float
) -> None:
    lines = report_start("Partition", setup)
    lines += [
        f"{args.jobs} jobs over three cuts of host A ({args.cut_seconds:g} s each): from "
        f"Redis, from PostgreSQL, from both. Two hosts (network namespaces), each with one API "
        f"and one worker (gevent, concurrency {args.concurrency}); beat on host B; upstream "
        f"{args.latency:g} +- {args.jitter:g} s per call; "
        + settings_text(FAST_RECOVERY_SETTINGS)
        + ".",
        "",
    ]
    rows = []
    for r in results:
        bound_met = r.duplicate_calls <= r.in_flight_on_a
        time_met = r.finished_after_heal <= TARGET_FINISHED_AFTER_HEAL_SECONDS
        rows.append(
            [
                f"A cut from {r.label}",
                f"{r.accepted} / {r.jobs}",
                f"{r.lost}" + (f" ({r.unfinished} unfinished)" if r.unfinished else ""),
                f"{r.duplicate_calls} (≤ {r.in_flight_on_a}: {met(bound_met)})",
                str(r.in_flight_on_a),
                str(r.calls_on_a_during_cut),
                f"{r.finished_after_heal:.1f} s ({met(time_met)})",
            ]
        )
    header = [
        "Cut",
        "Jobs accepted",
        "Lost",
        "Duplicate calls (≤ in flight on A)",
        "In flight on A at the cut",
        "Calls made on A during the cut",
        "Last job finished after the heal (< 60 s)",
    ]
    lines += [markdown_table(header, rows), ""]
    resent = [
        f"{r.label}: "
        + (", ".join(f"{n} x {why}" for why, n in r.resent.most_common()) or "none")
        + f" (accepted by A {r.accepted_by['a']}, by B {r.accepted_by['b']})"
        for r in results
    ]
    lines += [
        "Clients resent a job to the other host's API after: " + "; ".join(resent) + ". "
        "'Last job finished after the heal': from the moment host A's link came back until "
        "the last job of that cut finished (its `finished_at`). Duplicate calls: both "
        "simulators' calls for the cut's prompts beyond one per job. "
        f"{seconds:.0f} s in all.",
    ]
    print_markdown(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        netns.check_available()
    except netns.HostsUnavailable as exc:
        log(f"cannot make hosts: {exc}")
        return 2
    began = time.monotonic()
    results: list[CutResult] = []
    with bench_run(args, DEFAULT_REDIS_URL, prefix="promptq-partition-", logs=args.logs) as (
        stack,
        setup,
    ):
        results = run(args, stack, setup)
    print_report(args, setup, results, time.monotonic() - began)
    return 1 if any(r.lost for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
