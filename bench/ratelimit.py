"""promptq's rate limiter against an upstream that enforces its limit second by second.

    .venv/bin/python bench/ratelimit.py                # fresh PostgreSQL database, Redis db 13
    .venv/bin/python bench/ratelimit.py --sqlite       # a fresh SQLite file instead
    .venv/bin/python bench/ratelimit.py --rpm 600 --jobs 600

Three measures, run as a deployment runs: `promptq api` (one uvicorn process), four
`promptq worker` processes (Celery, gevent pool; each runs its own dispatcher) and
`promptq beat` (the sweeper) are child processes sharing one Redis; the upstream simulator,
enforcing a real token bucket, runs in this process. Only 127.0.0.1 is contacted.

1. Steady state: promptq configured at `--rpm` (with `--burst-seconds`), the simulator
   enforcing the same rpm as a one-second bucket (a minute's limit second by second). A
   backlog of `--jobs` jobs is submitted through the API as fast as the clients go.
2. The limiter's own cost: `Limiter.acquire` (a job arriving, granted at once) and
   `Limiter.dispatch` (the head of a queue granted), sequential round trips from this
   process to the same Redis, limits far above the load. Measured before any worker starts,
   so no dispatcher shares Redis with it.
3. A limit configured twice too high: promptq at 2 x `--rpm` (`--too-high`), the simulator
   granting `--rpm`, first without anthropic-ratelimit-* headers (promptq must find the limit from
   429s alone), then with them.

4. Token limits (`--tokens`), as the upstream counts them: token buckets a minute deep, a
   call taking `max_tokens` of output when it starts and giving back what it did not write,
   cache reads outside the input limit. Three shapes, each at a realistic latency: an
   output-bound model (6,000 output tokens a minute, max_tokens 200, 100 written, 5 s), large
   calls (80,000 output tokens a minute, max_tokens 4,096, 10 s) and an input-bound model
   whose prompts are 80% read from the prompt cache. Targets: 95% of the rate the upstream
   sustains after the first minute, at most 0.1% of calls refused, at least 18 large calls
   in flight at once.

Each load run has its own model name (its own bucket in Redis, its own limits-file entry),
so the runs share one stack without sharing limiter state; the simulator's bucket and
counters are reset between runs. In runs 1 and 3, input and output token limits are
"unlimited" and max_concurrency far above the workers' threads, so requests per minute is
what binds; in the token runs, tokens bind.

Everything started here is stopped, and the fresh database dropped, however the run ends
(ExitStack; bounded loops and deadlines). Exit status 1 means jobs were lost or did not
succeed; missed performance targets are only reported. Progress goes to stderr; stdout is
Markdown.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import redis
from sqlalchemy import Engine, text

# Run as a script (`python bench/ratelimit.py`), the bench directory is on sys.path, not
# the repository; _stack and _report are imported as sibling modules either way.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import (
    describe_statuses,
    failures_table,
    markdown_table,
    met,
    print_markdown,
    report_start,
)
from _stack import (
    Child,
    DatabaseInfo,
    Setup,
    Submitted,
    add_store_options,
    bench_engine,
    bench_run,
    count_jobs,
    create_api_key,
    epoch,
    failed_jobs,
    log,
    percentile,
    postgres_connections,
    require_at_least_one,
    stack_env,
    start_api,
    start_beat,
    start_worker,
    submit_jobs,
    task_errors,
    write_limits_file,
)

from promptq.ratelimit.limiter import RedisLimiter
from promptq.ratelimit.table import LimitTable
from promptq.redis_keys import MODELS_WAITING
from promptq.testing import FINAL
from promptq.usage import Usage

if TYPE_CHECKING:
    from promptq.simulator import Simulator

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
POLL_SECONDS = 0.25
# The simulator's bucket holds one second of its rate: a minute's limit enforced second by
# second, as Anthropic does.
UPSTREAM_BURST_SECONDS = 1.0
# Its token buckets are a minute deep, as Anthropic's are.
UPSTREAM_TOKEN_BURST_SECONDS = 60.0
COST_WARMUP = 200
# Model names must start with "claude-" for the simulator. One per load run: its own bucket.
STEADY_MODEL = "claude-bench-steady"
TWICE_MODEL_PREFIX = "claude-bench-twice"
COST_MODEL_PREFIX = "claude-bench-cost"


@dataclass(frozen=True)
class TokenShape:
    title: str
    jobs: int
    latency: float
    max_tokens: int
    output_tokens: int  # what each answer writes ([[sim:output=N]])
    input_tpm: int | None
    output_tpm: int | None
    # The prompt: a system block marked for the prompt cache, and a user message of its own;
    # in the simulator's counting (4 characters a token).
    cached_tokens: int = 0
    uncached_tokens: int = 20
    sustainable_per_second: float | None = None  # what the upstream's limits allow, steady
    min_in_flight: int | None = None  # a target on the calls in flight at once
    # The baseline, in the same run: as many jobs of the same shape through token meters of
    # half a second (BASELINE_TOKEN_BURST_SECONDS, the limiter before its meters were as
    # deep as the upstream's buckets). Few, since they go one or two at a time.
    baseline_jobs: int = 8


# The token scenarios: the shapes issue 11 names, each against a simulator whose token
# buckets are a minute deep and that answers at a realistic latency.
TOKEN_MODEL_PREFIX = "claude-bench-tokens"
TOKEN_SCENARIOS = {
    "output-bound": TokenShape(
        title="Output-bound: 6,000 output tokens a minute, max_tokens 200, 100 written, "
        "5 s answers",
        jobs=180,
        latency=5.0,
        max_tokens=200,
        output_tokens=100,
        input_tpm=None,
        output_tpm=6000,
        sustainable_per_second=6000 / 100 / 60,
    ),
    "large-calls": TokenShape(
        title="Large calls: 80,000 output tokens and 4,000 requests a minute, max_tokens "
        "4,096, 1,000 written, 10 s answers",
        jobs=60,
        latency=10.0,
        max_tokens=4096,
        output_tokens=1000,
        input_tpm=None,
        output_tpm=80_000,
        min_in_flight=18,
    ),
    "input-cached": TokenShape(
        title="Input-bound, 80% of each prompt read from the cache: 24,000 input tokens a "
        "minute, prompts of 1,250 tokens (1,000 cached), 5 s answers",
        jobs=200,
        latency=5.0,
        max_tokens=64,
        output_tokens=20,
        input_tpm=24_000,
        output_tpm=None,
        cached_tokens=1000,
        uncached_tokens=250,
        sustainable_per_second=24_000 / 250 / 60,
    ),
}
TOKEN_RPM = 4000
BASELINE_TOKEN_BURST_SECONDS = 0.5
TOKEN_WARMUP_SECONDS = 60  # "after the first minute": the bucket's first fill is spent
TARGET_TOKEN_SHARE = 0.95
TARGET_TOKEN_429_SHARE = 0.001

TARGET_STEADY_SHARE = 0.95
TARGET_STEADY_429_SHARE = 0.001
TARGET_ACQUIRE_P99_MS = 2.0
TARGET_TWICE_429_SHARE = 0.10


def pct(part: float, whole: float, digits: int = 1) -> str:
    return f"{100 * part / whole:.{digits}f}%" if whole else "n/a"


# ---------------------------------------------------------------------------------------------
# Limits


def too_high_rpm(args: argparse.Namespace) -> int:
    return round(args.too_high * args.rpm)


def limits_toml(rpm: int, too_high: int, burst_seconds: float) -> str:
    """The run's limits file: requests per minute bind, nothing else does."""

    def entry(pattern: str, model_rpm: int) -> str:
        return f"""
[models."{pattern}"]
rpm = {model_rpm}
input_tpm = "unlimited"
output_tpm = "unlimited"
max_concurrency = 10000
burst_seconds = {burst_seconds}
"""

    tokens = "".join(
        f"""
[models."{TOKEN_MODEL_PREFIX}-{name}{suffix}"]
rpm = {TOKEN_RPM}
input_tpm = {shape.input_tpm or '"unlimited"'}
output_tpm = {shape.output_tpm or '"unlimited"'}
max_concurrency = 400
{extra}"""
        for name, shape in TOKEN_SCENARIOS.items()
        for suffix, extra in (
            ("", ""),
            ("-baseline", f"token_burst_seconds = {BASELINE_TOKEN_BURST_SECONDS}\n"),
        )
    )
    return entry(STEADY_MODEL, rpm) + entry(f"{TWICE_MODEL_PREFIX}-*", too_high) + tokens


# Phase 2: every meter on, far above a few thousand calls a second, so that each call does
# all its bookkeeping yet is always granted.
COST_LIMITS = f"""
[models."{COST_MODEL_PREFIX}-*"]
rpm = 1000000
input_tpm = 100000000
output_tpm = 100000000
max_concurrency = 10000
burst_seconds = 1
"""


# ---------------------------------------------------------------------------------------------
# 2. The limiter's own cost


@dataclass
class CostReport:
    rows: list[list[str]]
    notes: list[str]
    acquire_p99_ms: float


def _timed(samples: list[float], began: int, warm: bool) -> None:
    if warm:
        samples.append((time.perf_counter_ns() - began) / 1e6)


def run_cost(args: argparse.Namespace, redis_url: str) -> CostReport:
    """Sequential round trips from this process: acquire (granted at once), acquire (queued
    behind others), dispatch (the queue's head granted), settle."""
    client = redis.Redis.from_url(redis_url)
    try:
        generous = RedisLimiter(client, LimitTable.from_toml(COST_LIMITS))
        # The same bucket with one concurrency slot: every job after the first queues.
        gate = RedisLimiter(
            client,
            LimitTable.from_toml(
                COST_LIMITS.replace("max_concurrency = 10000", "max_concurrency = 1")
            ),
        )
        request = {
            "model": f"{COST_MODEL_PREFIX}-x",
            "max_tokens": 1024,
            "messages": [
                {"role": "user", "content": "Summarize the plot of Hamlet in one sentence."}
            ],
        }
        usage = Usage(input_tokens=20, output_tokens=40)
        total = args.cost_calls + COST_WARMUP
        acquire: list[float] = []
        settle: list[float] = []
        queued: list[float] = []
        dispatch: list[float] = []

        direct_model = f"{COST_MODEL_PREFIX}-direct"
        log(f"limiter cost: {args.cost_calls} acquire + settle (after {COST_WARMUP} warm-up)")
        for i in range(total):
            began = time.perf_counter_ns()
            decision = generous.acquire(f"job-direct-{i}", direct_model, request, "normal")
            _timed(acquire, began, i >= COST_WARMUP)
            if decision.grant is None:
                raise RuntimeError(
                    f"acquire was refused ({decision.waiting_for}) under generous limits"
                )
            began = time.perf_counter_ns()
            generous.settle(decision.grant, usage)
            _timed(settle, began, i >= COST_WARMUP)

        queue_model = f"{COST_MODEL_PREFIX}-queue"
        log(f"limiter cost: {args.cost_calls} jobs queued, then dispatched")
        blocker = gate.acquire("job-blocker", queue_model, request, "normal").grant
        if blocker is None:
            raise RuntimeError("the first acquire of an empty bucket was refused")
        for i in range(total):
            began = time.perf_counter_ns()
            decision = gate.acquire(f"job-queued-{i}", queue_model, request, "normal")
            _timed(queued, began, i >= COST_WARMUP)
            if decision.grant is not None:
                raise RuntimeError("a job was granted past a single concurrency slot")
        generous.settle(blocker, usage)
        for i in range(total):
            began = time.perf_counter_ns()
            offer = generous.dispatch(queue_model)
            _timed(dispatch, began, i >= COST_WARMUP)
            if offer.grant is None:
                raise RuntimeError(f"dispatch granted nothing: {offer}")
            generous.settle(offer.grant, usage)
        leftover = generous.dispatch(queue_model)
        if not leftover.empty:
            raise RuntimeError("the queue was not empty after dispatching every job")
        for model in (direct_model, queue_model):
            client.delete(*RedisLimiter.keys(model)[:4], RedisLimiter.keys(model)[5])
            client.srem(MODELS_WAITING, model)
    finally:
        client.close()

    def row(name: str, samples: list[float], target: bool = False) -> list[str]:
        p99 = percentile(samples, 99)
        return [
            name,
            f"{percentile(samples, 50):.3f} ms",
            f"{p99:.3f} ms",
            f"{max(samples):.3f} ms",
            f"p99 < {TARGET_ACQUIRE_P99_MS:g} ms" if target else "",
            met(p99 < TARGET_ACQUIRE_P99_MS) if target else "",
        ]

    rows = [
        row("`Limiter.acquire`, direct mode, granted", acquire, target=True),
        row("`Limiter.dispatch`, queue head granted", dispatch, target=True),
        row("`Limiter.acquire`, direct mode, queued behind others", queued),
        row("`Limiter.settle` (after the call)", settle),
    ]
    notes = [
        f"{args.cost_calls} sequential calls of each, after {COST_WARMUP} unmeasured, from "
        "one process and one connection to the same Redis, before any worker started; each "
        "time is the whole Python call (building arguments, EVALSHA, the Lua script, "
        f"parsing the reply). The dispatch queue held {args.cost_calls + COST_WARMUP} jobs "
        "at the start.",
    ]
    return CostReport(rows, notes, percentile(acquire, 99))


# ---------------------------------------------------------------------------------------------
# 1 and 3. Load runs


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str
    configured_rpm: int
    upstream_rpm: int | None
    headers: bool
    # Token scenarios (TOKEN_SCENARIOS): the simulator's token limits (as deep as Anthropic's
    # buckets, a minute), its latency, and the jobs' shape. None: a request scenario.
    tokens: TokenShape | None = None


@dataclass
class Sample:
    at: float  # time.time()
    factor: float
    paused: bool
    reported_rpm: int | None
    waiting: int


@dataclass
class LoadResult:
    scenario: Scenario
    submitted: Submitted
    by_status: dict[str, int]
    failures: list[list[str]]
    calls_by_second: dict[int, int]
    upstream_by_status: dict[str, int]
    upstream_calls: int
    max_in_flight: int
    # (when the call was sent, epoch seconds; its upstream status), from the attempts table
    attempts: list[tuple[float, int | None]]
    trace: list[Sample]
    timed_out: bool
    seconds: float
    # Tasks that raised in a worker during the run (their messages are gone: the sweeper
    # publishes those jobs again after PROMPTQ_REPUBLISH_AFTER_SECONDS).
    errors: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> int:
        return self.by_status.get("succeeded", 0)


def job_body(index: int, scenario: Scenario) -> bytes:
    prompt = f"[{scenario.name} {index}] Summarize the plot of Hamlet in one sentence."
    shape = scenario.tokens
    if shape is None:
        return json.dumps({"prompt": prompt, "model": scenario.model}).encode()
    prompt = f"{prompt} [[sim:output={shape.output_tokens}]] "
    prompt += "x" * max(0, 4 * shape.uncached_tokens - len(prompt))
    request: dict[str, object] = {
        "model": scenario.model,
        "max_tokens": shape.max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    }
    if shape.cached_tokens:
        handbook = ("The house style guide, read before every answer. " * 400)[
            : 4 * shape.cached_tokens
        ]
        request["system"] = [
            {"type": "text", "text": handbook, "cache_control": {"type": "ephemeral"}}
        ]
    return json.dumps({"request": request}).encode()


def scenario_jobs(args: argparse.Namespace, scenario: Scenario) -> int:
    return scenario.tokens.jobs if scenario.tokens else args.jobs


def configure_upstream(simulator: Simulator, args: argparse.Namespace, scenario: Scenario) -> None:
    """Every setting a run depends on, so that nothing of the run before carries over."""
    shape = scenario.tokens
    simulator.configure(
        rpm=scenario.upstream_rpm,
        burst_seconds=UPSTREAM_BURST_SECONDS,
        token_burst_seconds=UPSTREAM_TOKEN_BURST_SECONDS,
        input_tpm=shape.input_tpm if shape else None,
        output_tpm=shape.output_tpm if shape else None,
        ratelimit_headers=scenario.headers,
        latency=shape.latency if shape else args.latency,
    )
    simulator.reset()


def expected_seconds(args: argparse.Namespace, scenario: Scenario) -> float:
    """How long the run should take at the upstream's limits."""
    jobs = scenario_jobs(args, scenario)
    shape = scenario.tokens
    if shape is None:
        return jobs / (float(scenario.upstream_rpm or 60) / 60)
    rate = shape.sustainable_per_second or jobs / 60
    return shape.latency + jobs / rate


def run_load(
    args: argparse.Namespace,
    scenario: Scenario,
    engine: Engine,
    database: DatabaseInfo,
    api_url: str,
    workers: list[Child],
    simulator: Simulator,
    observer: RedisLimiter,
) -> LoadResult:
    key_id, key = create_api_key(database.url, f"bench-{scenario.name}")
    configure_upstream(simulator, args, scenario)
    jobs = scenario_jobs(args, scenario)
    bodies = [job_body(i, scenario) for i in range(jobs)]
    errors_before = len(task_errors(workers))
    # Three times what the upstream's limits need, plus a minute: a stuck run still ends.
    timeout = 60.0 + 3.0 * expected_seconds(args, scenario)
    log(
        f"{scenario.name}: {jobs} jobs, promptq at {scenario.configured_rpm} rpm, upstream "
        f"at {scenario.upstream_rpm} rpm, headers {'on' if scenario.headers else 'off'}; "
        f"timeout {timeout:.0f} s"
    )
    box: list[Submitted] = []
    submitter = threading.Thread(
        target=lambda: box.append(
            submit_jobs(api_url, key, bodies, args.clients, 60.0 + jobs / 10.0)
        ),
        name="submitter",
        daemon=True,
    )
    began = time.monotonic()
    submitter.start()
    deadline = began + timeout
    trace: list[Sample] = []
    finished = 0
    last_report = began
    submitted_logged = False
    while time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        for worker in workers:
            worker.check_alive()
        state = observer.snapshot(scenario.model)
        trace.append(
            Sample(
                at=time.time(),
                factor=float(state["factor"]),
                paused=state["paused_for_seconds"] > 0,
                reported_rpm=state["reported"].get("req"),
                waiting=int(state["waiting"]),
            )
        )
        finished = count_jobs(engine, key_id, FINAL)
        if box and not submitted_logged:
            done = box[0]
            log(
                f"{scenario.name}: submitted {done.accepted}/{jobs} in {done.seconds:.1f} s "
                f"({done.accepted / done.seconds:.0f} jobs/s)"
            )
            submitted_logged = True
        if time.monotonic() - last_report >= 10:
            log(
                f"{scenario.name}: {finished}/{jobs} finished, {state['waiting']} waiting, "
                f"factor {state['factor']}"
            )
            last_report = time.monotonic()
        if finished >= jobs:
            break
        if not submitter.is_alive() and box and finished >= box[0].accepted:
            break  # some submissions failed; every accepted job is done
    timed_out = finished < jobs and time.monotonic() >= deadline
    seconds = time.monotonic() - began
    submitter.join(timeout=40)
    if not box:
        raise RuntimeError("the submitting clients did not finish")
    stats = simulator.stats()

    with engine.connect() as connection:
        by_status = {
            str(row[0]): int(row[1])
            for row in connection.execute(
                text("SELECT status, count(*) FROM jobs WHERE api_key_id = :key GROUP BY status"),
                {"key": key_id},
            )
        }
        failures = failed_jobs(connection, key_id)
        attempt_rows = connection.execute(
            text(
                "SELECT a.finished_at, a.latency_ms, a.status_code FROM attempts a"
                " JOIN jobs j ON j.id = a.job_id WHERE j.api_key_id = :key"
            ),
            {"key": key_id},
        ).all()
    # The attempt's latency is the HTTP call's: the call went out that long before it ended.
    attempts = sorted(
        (
            (epoch(row[0]) - (row[1] or 0) / 1000, None if row[2] is None else int(row[2]))
            for row in attempt_rows
        ),
        key=lambda attempt: attempt[0],
    )
    return LoadResult(
        scenario=scenario,
        submitted=box[0],
        by_status=by_status,
        failures=failures,
        calls_by_second={int(k): int(v) for k, v in stats["calls_by_second"].items()},
        upstream_by_status={str(k): int(v) for k, v in stats["by_status"].items()},
        upstream_calls=int(stats["calls"]),
        max_in_flight=int(stats["max_in_flight"]),
        attempts=attempts,
        trace=trace,
        timed_out=timed_out,
        seconds=seconds,
        errors=task_errors(workers)[errors_before:],
    )


# ---------------------------------------------------------------------------------------------
# Analysis


@dataclass
class Analysis:
    first: int  # epoch second of the first call to arrive at the simulator
    last: int
    window: range  # epoch seconds of the steady-state window
    trimmed: bool  # False: the run was too short to trim, the window is the whole run
    calls: int
    throttled: int
    calls_in_window: int
    ok_in_window: int
    throttled_in_window: int
    achieved_rate: float  # successful calls per second in the window
    whole_rate: float  # successful calls per second, first call to last
    peak: int  # the most calls arriving at the simulator in one wall-clock second
    peak_offset: int
    peak_in_window: int
    sliding_peak: int  # the most calls sent in any one-second interval
    throttle_offsets: list[float] = field(default_factory=list)
    min_factor: float = 1.0
    min_factor_offset: float = 0.0
    paused_seconds: float = 0.0
    # Jobs waiting in the model's limiter queue, sampled: the window measures the limiter
    # only if work was always waiting.
    peak_waiting: int = 0
    min_waiting_in_window: int = 0


def analyse(result: LoadResult, edge: int) -> Analysis:
    by_second = result.calls_by_second
    if not by_second:
        raise RuntimeError(f"{result.scenario.name}: no call reached the simulator")
    first, last = min(by_second), max(by_second)
    trimmed = last - first + 1 >= 2 * edge + 10
    window = range(first + edge, last - edge + 1) if trimmed else range(first, last + 1)
    calls_in_window = sum(by_second.get(s, 0) for s in window)
    ok_in_window = sum(1 for at, status in result.attempts if status == 200 and int(at) in window)
    throttled_in_window = sum(
        1 for at, status in result.attempts if status == 429 and int(at) in window
    )
    times = [at for at, _ in result.attempts]
    ok = sum(1 for _, status in result.attempts if status == 200)
    span = (times[-1] - times[0]) if len(times) > 1 else 0.0
    peak_second = max(by_second, key=lambda s: by_second[s])
    sliding = 0
    for i, at in enumerate(times):
        sliding = max(sliding, bisect.bisect_left(times, at + 1.0) - i)
    start = times[0] if times else float(first)
    throttle_offsets = [at - start for at, status in result.attempts if status == 429]
    in_run = [s for s in result.trace if start <= s.at]
    lowest = min(in_run, key=lambda s: s.factor, default=None)
    return Analysis(
        first=first,
        last=last,
        window=window,
        trimmed=trimmed,
        calls=result.upstream_calls,
        throttled=result.upstream_by_status.get("429", 0),
        calls_in_window=calls_in_window,
        ok_in_window=ok_in_window,
        throttled_in_window=throttled_in_window,
        achieved_rate=ok_in_window / len(window),
        whole_rate=ok / span if span > 0 else 0.0,
        peak=by_second[peak_second],
        peak_offset=peak_second - first,
        peak_in_window=max((by_second.get(s, 0) for s in window), default=0),
        sliding_peak=sliding,
        throttle_offsets=throttle_offsets,
        min_factor=lowest.factor if lowest else 1.0,
        min_factor_offset=(lowest.at - start) if lowest else 0.0,
        paused_seconds=POLL_SECONDS * sum(1 for s in in_run if s.paused),
        peak_waiting=max((s.waiting for s in result.trace), default=0),
        min_waiting_in_window=min(
            (s.waiting for s in result.trace if int(s.at) in window), default=0
        ),
    )


def timeline(result: LoadResult, analysis: Analysis, per_line: int = 15) -> str:
    """Per second from the first call: calls arriving at the simulator, of them answered
    429, and promptq's rate in force (configured, capped by reported limits, times the
    adaptive factor; `p`: paused after a 429 or a reported `remaining: 0`)."""
    throttled = Counter(int(at) for at, status in result.attempts if status == 429)
    configured = result.scenario.configured_rpm
    seconds = list(range(analysis.first, analysis.last + 1))
    in_force: dict[int, str] = {}
    for second in seconds:
        samples = [s for s in result.trace if int(s.at) == second]
        if not samples:
            continue
        last = samples[-1]
        rpm = min(configured, last.reported_rpm or configured) * last.factor
        in_force[second] = f"{rpm / 60:.0f}" + ("p" if any(s.paused for s in samples) else "")
    lines: list[str] = []
    for start in range(0, len(seconds), per_line):
        chunk = seconds[start : start + per_line]
        rows = [
            ("second", [str(s - analysis.first) for s in chunk]),
            ("calls", [str(result.calls_by_second.get(s, 0)) for s in chunk]),
            ("429", [str(throttled.get(s, 0)) for s in chunk]),
            ("limit/s", [in_force.get(s, "") for s in chunk]),
        ]
        for label, cells in rows:
            lines.append(f"{label:<8}" + "".join(f"{cell:>5}" for cell in cells))
        lines.append("")
    return "\n".join(lines).rstrip()


def window_note(analysis: Analysis, edge: int) -> str:
    if analysis.trimmed:
        return (
            f"Steady-state window: seconds {analysis.window.start - analysis.first} to "
            f"{analysis.window.stop - 1 - analysis.first} after the first call "
            f"({len(analysis.window)} s): the run's first and last {edge} wall-clock seconds "
            "with calls are left out (the opening burst, the backlog running dry)."
        )
    return f"The run was too short to trim {edge} s at each end: the window is the whole run."


def steady_rows(result: LoadResult, a: Analysis, burst_seconds: float) -> list[list[str]]:
    rate = result.scenario.configured_rpm / 60
    allowed = rate * (1 + burst_seconds)
    share = a.achieved_rate / rate
    jobs = result.submitted.requested
    return [
        [
            "Achieved rate in the window (calls answered 200)",
            f"{a.achieved_rate:.2f}/s = {pct(a.achieved_rate, rate)} of {rate:g}/s",
            f"≥ {TARGET_STEADY_SHARE:.0%}",
            met(share >= TARGET_STEADY_SHARE),
        ],
        [
            "429s / upstream calls",
            f"{a.throttled} / {a.calls} = {pct(a.throttled, a.calls, 2)}",
            f"≤ {TARGET_STEADY_429_SHARE:.1%}",
            met(a.throttled <= TARGET_STEADY_429_SHARE * a.calls),
        ],
        [
            "Most calls arriving in one wall-clock second",
            f"{a.peak} (second {a.peak_offset}); in the window {a.peak_in_window}",
            f"≤ {allowed:g} ({rate:g}/s + {burst_seconds:g} s burst)",
            met(a.peak <= allowed + 1e-9),
        ],
        [
            "Succeeded / submitted",
            f"{result.succeeded} / {jobs}",
            "all",
            met(result.succeeded == jobs),
        ],
        ["Most calls sent in any 1 s interval (sliding)", str(a.sliding_peak), "", ""],
        [
            "Whole run, first call to last (calls answered 200)",
            f"{a.whole_rate:.2f}/s = {pct(a.whole_rate, rate)}",
            "",
            "",
        ],
    ]


def run_notes(result: LoadResult, a: Analysis) -> list[str]:
    sub = result.submitted
    notes = [
        f"Submitted {sub.accepted} jobs in {sub.seconds:.1f} s "
        f"({sub.accepted / sub.seconds:.0f}/s); "
        f"calls from {a.last - a.first + 1} wall-clock seconds; run {result.seconds:.0f} s.",
        f"Upstream answers: {describe_statuses(result.upstream_by_status)}; attempts recorded: "
        f"{len(result.attempts)}; most calls in flight at the simulator: {result.max_in_flight}.",
    ]
    if a.throttled:
        offsets = ", ".join(f"{t:.1f}" for t in a.throttle_offsets[:12])
        more = f" (+{len(a.throttle_offsets) - 12} more)" if len(a.throttle_offsets) > 12 else ""
        notes.append(f"429s at (s after the first call): {offsets}{more}.")
    notes.append(
        f"Jobs waiting in the limiter's queue: at most {a.peak_waiting}, at least "
        f"{a.min_waiting_in_window} within the window."
    )
    notes.append(
        f"Lowest adaptive factor seen: {a.min_factor:.2f} at {a.min_factor_offset:.1f} s; "
        f"paused about {a.paused_seconds:.2f} s of the run (sampled every {POLL_SECONDS:g} s)."
    )
    if result.by_status.keys() - {"succeeded"}:
        notes.append(f"Jobs by status: {dict(sorted(result.by_status.items()))}.")
    if sub.errors:
        notes.append(f"{len(sub.errors)} submission errors; first: {sub.errors[0]}")
    if result.errors:
        first = result.errors[0].split("raised unexpected: ", 1)[-1][:200]
        notes.append(f"{len(result.errors)} tasks raised in the workers; first: {first}")
    if result.timed_out:
        notes.append(f"Timed out after {result.seconds:.0f} s with jobs unfinished.")
    return notes


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rpm", type=int, default=1200, help="promptq's configured and the upstream's rpm (1200)"
    )
    parser.add_argument(
        "--burst-seconds",
        type=float,
        default=0.25,
        help="burst_seconds in promptq's limits file (default 0.25)",
    )
    parser.add_argument("--jobs", type=int, default=1200, help="jobs per load run (default 1200)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="threads per worker (default 8: far more than the calls in flight at these "
        "rates, and 4 workers x 8 stay clear of PostgreSQL's default 100 connections)",
    )
    parser.add_argument("--clients", type=int, default=8, help="submitting clients (default 8)")
    parser.add_argument(
        "--latency", type=float, default=0.05, help="simulated upstream seconds (default 0.05)"
    )
    parser.add_argument(
        "--edge-seconds",
        type=int,
        default=5,
        help="seconds left out at each end of a run for the steady-state window (default 5)",
    )
    parser.add_argument(
        "--cost-calls", type=int, default=5000, help="limiter calls timed of each kind (5000)"
    )
    add_store_options(
        parser,
        DEFAULT_REDIS_URL,
        "Redis for the broker and the limiter, FLUSHED before and after the run",
    )
    parser.add_argument("--logs", type=Path, help="copy the API's and workers' logs here")
    parser.add_argument(
        "--no-beat",
        action="store_true",
        help="do not run `promptq beat` (the sweeper that publishes lost jobs again)",
    )
    parser.add_argument("--skip-steady", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument(
        "--too-high",
        type=float,
        default=2.0,
        help="measure 3: promptq's rpm as a multiple of the upstream's (default 2)",
    )
    parser.add_argument("--skip-twice", action="store_true")
    parser.add_argument(
        "--skip-tokens", action="store_true", help="do not run the token scenarios (about 6 min)"
    )
    parser.add_argument(
        "--tokens",
        default=",".join(TOKEN_SCENARIOS),
        help=f"token scenarios to run, comma-separated (default: {','.join(TOKEN_SCENARIOS)})",
    )
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.tokens.split(","))) - set(TOKEN_SCENARIOS)
    if unknown:
        parser.error(f"unknown token scenario(s): {', '.join(sorted(unknown))}")
    require_at_least_one(
        parser, args, ("rpm", "jobs", "workers", "concurrency", "clients", "cost_calls")
    )
    if args.too_high < 1 or too_high_rpm(args) > 1_000_000:
        parser.error(
            "--too-high must be at least 1, and --rpm x --too-high at most 1,000,000 (the "
            "limit table's cap)"
        )
    if not 0 < args.burst_seconds <= 60:
        parser.error("--burst-seconds must be more than 0 and at most 60")
    if args.latency < 0 or args.edge_seconds < 0:
        parser.error("--latency and --edge-seconds must be >= 0")
    return args


@dataclass
class Results:
    steady: LoadResult | None = None
    cost: CostReport | None = None
    twice: list[LoadResult] = field(default_factory=list)
    tokens: list[LoadResult] = field(default_factory=list)
    # The baseline of each token run, by the token run's scenario name.
    baselines: dict[str, LoadResult] = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    results = Results()
    connections: tuple[int, int] | None = None
    load_runs = not (args.skip_steady and args.skip_twice and args.skip_tokens)
    with bench_run(args, DEFAULT_REDIS_URL, logs=args.logs) as (stack, setup):
        connections = postgres_connections(setup.database.url)
        if not args.skip_cost:
            # First, while no worker (and so no dispatcher) uses Redis.
            results.cost = run_cost(args, setup.redis.url)
        if load_runs:
            run_loads(args, stack, setup, results)
    total = time.monotonic() - began
    print_report(args, setup, connections, results, total)
    log(f"total run time {total:.0f} s")
    runs = [r for r in (results.steady, *results.twice, *results.tokens) if r is not None]
    ok = all(r.succeeded == r.submitted.requested for r in runs)
    return 0 if ok else 1


def run_loads(
    args: argparse.Namespace, stack: contextlib.ExitStack, setup: Setup, results: Results
) -> None:
    from promptq.simulator import Simulator, SimulatorConfig

    workdir, database = setup.workdir, setup.database
    limits_path = write_limits_file(
        workdir, limits_toml(args.rpm, too_high_rpm(args), args.burst_seconds)
    )
    # The simulator binds its port at construction, so its URL is known now; its serving
    # thread starts only after every child has been started, so that the benchmark holds
    # no threads of its own while it forks.
    simulator = Simulator(
        SimulatorConfig(latency=args.latency, rpm=args.rpm, burst_seconds=UPSTREAM_BURST_SECONDS)
    )
    stack.callback(simulator.stop)
    env = stack_env(setup, limits_path, {"PROMPTQ_UPSTREAM_URL": simulator.url})
    api, api_url = start_api(stack, env, workdir)
    log(f"API at {api_url} (pid {api.pid})")
    workers = []
    for i in range(args.workers):
        workers.append(start_worker(stack, env, workdir, args.concurrency, name=f"worker-{i + 1}"))
        log(f"worker {i + 1} of {args.workers} ready (pid {workers[-1].pid})")
    if not args.no_beat:
        start_beat(stack, env, workdir)
        log("beat started")
    simulator.start()
    engine = bench_engine(stack, database.url)
    client = redis.Redis.from_url(setup.redis.url)
    stack.callback(client.close)
    observer = RedisLimiter(client, LimitTable.load(limits_path))

    def run(scenario: Scenario) -> LoadResult:
        return run_load(args, scenario, engine, database, api_url, workers, simulator, observer)

    if not args.skip_steady:
        results.steady = run(Scenario("steady", STEADY_MODEL, args.rpm, args.rpm, True))
    if not args.skip_twice:
        for headers in (False, True):
            name = f"twice-{'headers' if headers else 'no-headers'}"
            model = f"{TWICE_MODEL_PREFIX}-{'headers' if headers else 'no-headers'}"
            results.twice.append(run(Scenario(name, model, too_high_rpm(args), args.rpm, headers)))
    if not args.skip_tokens:
        for name in filter(None, args.tokens.split(",")):
            scenario = Scenario(
                f"tokens-{name}",
                f"{TOKEN_MODEL_PREFIX}-{name}",
                TOKEN_RPM,
                TOKEN_RPM,
                True,
                tokens=TOKEN_SCENARIOS[name],
            )
            results.tokens.append(run(scenario))
            shape = TOKEN_SCENARIOS[name]
            baseline = Scenario(
                f"tokens-{name}-baseline",
                f"{TOKEN_MODEL_PREFIX}-{name}-baseline",
                TOKEN_RPM,
                TOKEN_RPM,
                True,
                tokens=dataclasses.replace(shape, jobs=shape.baseline_jobs),
            )
            results.baselines[scenario.name] = run(baseline)


def print_report(
    args: argparse.Namespace,
    setup: Setup,
    connections: tuple[int, int] | None,
    results: Results,
    total_seconds: float,
) -> None:
    rate = args.rpm / 60
    more_machine = []
    if connections is not None:
        in_use, most = connections
        more_machine.append(["PostgreSQL connections at start", f"{in_use} in use of {most}"])
    out = report_start("Rate limits", setup, more_machine)
    out += [
        f"Setup: one `promptq api` process, {args.workers} `promptq worker` processes "
        f"(gevent pool, concurrency {args.concurrency} each, one dispatcher each)"
        f"{'' if args.no_beat else ' and `promptq beat`'}; the "
        f"simulated upstream answers in {args.latency:g} s and enforces its rpm as a token "
        f"bucket of {UPSTREAM_BURST_SECONDS:g} s of its rate. Each load run submits "
        f"{args.jobs} jobs from {args.clients} clients as fast as the API takes them; "
        f'in runs 1 and 3, input and output token limits "unlimited" and max_concurrency '
        f"10000 (the token runs say their own). "
        f"Total run time {total_seconds:.0f} s.",
        "",
    ]
    steady = results.steady
    if steady is not None:
        a = analyse(steady, args.edge_seconds)
        out += [
            f"### 1. Steady state: promptq at {args.rpm} rpm (burst_seconds "
            f"{args.burst_seconds:g}), the upstream enforcing {args.rpm} rpm ({rate:g}/s)",
            "",
            markdown_table(
                ["Measure", "Result", "Target", ""], steady_rows(steady, a, args.burst_seconds)
            ),
            "",
            window_note(a, args.edge_seconds)
            + " The upstream sends anthropic-ratelimit-* headers.",
            "",
            " ".join(run_notes(steady, a)),
            "",
            "Per second after the first call: calls arriving at the simulator, of them 429, "
            "and promptq's rate in force (`p`: paused):",
            "",
            "```",
            timeline(steady, a),
            "```",
            "",
        ]
        out += failures_table(steady.failures)
    cost = results.cost
    if cost is not None:
        out += [
            "### 2. The limiter's own cost per call",
            "",
            markdown_table(["Call", "p50", "p99", "max", "Target", ""], cost.rows),
            "",
            " ".join(cost.notes),
            "",
        ]
    if results.twice:
        out += [
            f"### 3. Limit configured {_times(args.too_high)} too high: promptq at "
            f"{too_high_rpm(args)} rpm, the "
            f"upstream granting {args.rpm} rpm ({rate:g}/s)",
            "",
            markdown_table(
                ["Measure", *[_header_label(r) for r in results.twice], "Target"],
                twice_rows(results.twice, args.edge_seconds),
            ),
            "",
        ]
        for result in results.twice:
            a = analyse(result, args.edge_seconds)
            out += [
                f"**{_header_label(result)}.** " + window_note(a, args.edge_seconds),
                " ".join(run_notes(result, a)),
                "",
                "```",
                timeline(result, a),
                "```",
                "",
            ]
            out += failures_table(result.failures)
    for result in results.tokens:
        out += token_report(result, results.baselines.get(result.scenario.name))
    print_markdown(out)


def call_rate(result: LoadResult) -> float:
    """Calls answered 200 per second, first call sent to last answer."""
    starts = [at for at, status in result.attempts if status == 200]
    shape = result.scenario.tokens
    span = (starts[-1] - starts[0] + (shape.latency if shape else 0)) if starts else 0.0
    return len(starts) / span if span > 0 else 0.0


def token_report(result: LoadResult, baseline: LoadResult | None) -> list[str]:
    """A token scenario: the rate after the first minute (the bucket's first fill spent)
    against what the upstream's limits sustain, 429s, the calls in flight at once, and the
    same shape through half-second token meters (the baseline, this run)."""
    shape = result.scenario.tokens
    assert shape is not None
    starts = [at for at, _ in result.attempts]
    first = starts[0] if starts else 0.0
    last = starts[-1] if starts else 0.0
    from_, to = first + TOKEN_WARMUP_SECONDS, last
    throttled = result.upstream_by_status.get("429", 0)
    calls = result.upstream_calls
    jobs = result.submitted.requested
    rows = [
        [
            "Succeeded / submitted",
            f"{result.succeeded} / {jobs}",
            "all",
            met(result.succeeded == jobs),
        ],
        [
            "429s / upstream calls",
            f"{throttled} / {calls} = {pct(throttled, calls, 2)}",
            f"≤ {TARGET_TOKEN_429_SHARE:.1%}" if shape.min_in_flight is None else "none",
            met(
                throttled <= TARGET_TOKEN_429_SHARE * calls
                if shape.min_in_flight is None
                else throttled == 0
            ),
        ],
    ]
    if shape.sustainable_per_second is not None:
        rate = shape.sustainable_per_second
        if to - from_ >= 10:
            ok = sum(1 for at, status in result.attempts if status == 200 and from_ <= at < to)
            achieved = ok / (to - from_)
            rows.append(
                [
                    f"Calls answered 200 per second after the first minute ({to - from_:.0f} s)",
                    f"{achieved:.3f}/s = {pct(achieved, rate)} of {rate:.3g}/s",
                    f"≥ {TARGET_TOKEN_SHARE:.0%}",
                    met(achieved >= TARGET_TOKEN_SHARE * rate),
                ]
            )
        else:
            rows.append(["Rate after the first minute", "run too short to tell", "", ""])
    rows.append(
        [
            "Most calls in flight at the upstream at once",
            str(result.max_in_flight),
            f"≥ {shape.min_in_flight}" if shape.min_in_flight else "",
            met(result.max_in_flight >= shape.min_in_flight) if shape.min_in_flight else "",
        ]
    )
    span = last - first
    rows.append(
        [
            "Whole run, first call to last",
            f"{len(starts)} calls in {span:.0f} s = {len(starts) / span:.2f}/s" if span else "-",
            "",
            "",
        ]
    )
    if baseline is not None:
        ours, theirs = call_rate(result), call_rate(baseline)
        rows.append(
            [
                f"Baseline: {baseline.submitted.requested} jobs through token meters of "
                f"{BASELINE_TOKEN_BURST_SECONDS:g} s (the limiter before)",
                f"{baseline.max_in_flight} in flight at most, {theirs:.3f} calls/s "
                f"({baseline.upstream_by_status.get('429', 0)} x 429)",
                "",
                "",
            ]
        )
        rows.append(
            [
                "Calls per second, first call to last answer: this run / baseline",
                f"{ours:.3f} / {theirs:.3f} = {ours / theirs:.1f}x" if theirs else "-",
                "",
                "",
            ]
        )
    notes = [
        f"{jobs} jobs submitted at once; promptq's limits file gives the same token limits "
        f"(token meters a minute deep, the default), {TOKEN_RPM:,} rpm and max_concurrency 400; "
        f"the simulator's token buckets are {UPSTREAM_TOKEN_BURST_SECONDS:g} s deep and it "
        f"sends anthropic-ratelimit-* headers. Run {result.seconds:.0f} s.",
        f"Upstream answers: {describe_statuses(result.upstream_by_status)}.",
    ]
    if result.by_status.keys() - {"succeeded"}:
        notes.append(f"Jobs by status: {dict(sorted(result.by_status.items()))}.")
    if result.errors:
        notes.append(f"{len(result.errors)} tasks raised in the workers.")
    if result.timed_out:
        notes.append(f"Timed out after {result.seconds:.0f} s with jobs unfinished.")
    return [
        f"### Tokens: {shape.title}",
        "",
        markdown_table(["Measure", "Result", "Target", ""], rows),
        "",
        " ".join(notes),
        "",
        *failures_table(result.failures),
    ]


def _times(factor: float) -> str:
    return "twice" if factor == 2 else f"{factor:g} times"


def _header_label(result: LoadResult) -> str:
    return "Headers on" if result.scenario.headers else "No rate-limit headers (429s only)"


def twice_rows(runs: list[LoadResult], edge: int) -> list[list[str]]:
    analyses = [analyse(r, edge) for r in runs]

    def row(name: str, cells: list[str], target: str = "") -> list[str]:
        return [name, *cells, target]

    rows = [
        row(
            "Succeeded / submitted",
            [
                f"{r.succeeded} / {r.submitted.requested} "
                f"({met(r.succeeded == r.submitted.requested)})"
                for r in runs
            ],
            "all",
        ),
        row(
            "429s / upstream calls",
            [
                f"{a.throttled} / {a.calls} = {pct(a.throttled, a.calls, 2)} "
                f"({met(a.throttled < TARGET_TWICE_429_SHARE * a.calls)})"
                for a in analyses
            ],
            f"< {TARGET_TWICE_429_SHARE:.0%}",
        ),
        row(
            "Achieved rate in the window, share of the real limit",
            [
                f"{a.achieved_rate:.2f}/s = {pct(a.achieved_rate, r.scenario.upstream_rpm / 60)}"
                for r, a in zip(runs, analyses, strict=True)
            ],
        ),
        row(
            "Whole run, first call to last, share of the real limit",
            [
                f"{a.whole_rate:.2f}/s = {pct(a.whole_rate, r.scenario.upstream_rpm / 60)}"
                for r, a in zip(runs, analyses, strict=True)
            ],
        ),
        row(
            "Last 429, seconds after the first call",
            [f"{a.throttle_offsets[-1]:.1f}" if a.throttle_offsets else "none" for a in analyses],
        ),
        row(
            "Most calls arriving in one second",
            [f"{a.peak} (second {a.peak_offset})" for a in analyses],
        ),
    ]
    return rows


if __name__ == "__main__":
    sys.exit(main())
