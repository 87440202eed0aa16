"""promptq throughput: intake (POST /v1/jobs) and end-to-end (jobs finished per second).

    .venv/bin/python bench/throughput.py               # fresh PostgreSQL database, Redis db 14
    .venv/bin/python bench/throughput.py --sqlite      # a fresh SQLite file instead

Every piece runs as it does in a deployment: `promptq api` (one uvicorn process) and
`promptq worker` (Celery, gevent pool) are child processes; the upstream simulator runs in
this process. Only 127.0.0.1 is contacted. Everything started here is stopped, and the
fresh database dropped, however the run ends (ExitStack; bounded loops and deadlines);
even a SIGKILLed run takes its children with it (PR_SET_PDEATHSIG), though then its
`promptq_bench_*` database stays behind. Rate limits are set far above the load (the
limiter does its bookkeeping but never makes a job wait). Exit status 1 means jobs were
lost or failed; missed performance targets are only reported.

The intake phase then sends as many messages of a job's kind with plain Celery `send_task`
from as many threads, on the same Redis, and prints intake's rate over that one: what
promptq costs on top of the broker. At `--latency 0` (or with `--noop-baseline`) the
end-to-end phase first runs two other tasks, each in a worker of its own on the same
Redis, and prints a job's CPU over theirs: a no-op Celery task (bench/_noop_app.py), and
on PostgreSQL the floor (bench/_floor_app.py), a job's input and output with the drivers
called directly; with `--batched-floor MS`, the floor again with its claims and records
batched across the jobs that come within MS milliseconds.

Progress goes to stderr; stdout is Markdown, ready to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import math
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import psutil
import redis
from sqlalchemy import text
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from celery import Celery

# Run as a script (`python bench/throughput.py`), the bench directory is on sys.path, not
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
    HttpClient,
    Setup,
    add_store_options,
    bench_engine,
    bench_run,
    broker_messages,
    count_jobs,
    cpu_seconds,
    create_api_key,
    epoch,
    failed_jobs,
    flush_redis,
    log,
    percentile,
    require_at_least_one,
    stack_env,
    start_api,
    start_child,
    start_worker,
    wait_until,
    write_limits_file,
)

from promptq.testing import FINAL

MODEL = "claude-sonnet-4-6"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
POLL_SECONDS = 0.5
REQUEST_TIMEOUT_SECONDS = 30.0
# Warm-up requests per client before the clock starts: a GET of a job that does not exist
# opens the keep-alive connection and runs the auth query, but creates no job (a warm-up
# job would be run by the worker in the end-to-end phase and skew its count).
WARMUP_PER_CLIENT = 5

TARGET_INTAKE_RATE = 800.0
TARGET_INTAKE_P99_MS = 100.0
TARGET_WORKER_CORES = 1.0


@dataclass(frozen=True)
class Targets:
    """What issue 15 asks of one end-to-end scenario (concurrency, latency); unnamed
    scenarios are only measured."""

    rate: float | None = None  # jobs/s in the steady state
    in_flight: int | None = None  # calls at the simulator at once
    cpu_ms_per_job: float | None = None
    rss_mib: float | None = None
    postgres_connections: int | None = None
    # Worker CPU per job at most this many times a no-op Celery task's, same run.
    noop_ratio: float | None = None


E2E_TARGETS = {
    (1000, 10.0): Targets(
        rate=95, in_flight=950, cpu_ms_per_job=5, rss_mib=400, postgres_connections=20
    ),
    (100, 1.0): Targets(rate=90),
}
LATENCY_ZERO_TARGETS = Targets(noop_ratio=2.0)
# The steady state: from the moment a tenth of the jobs had finished to the moment nine
# tenths had. Before it the worker fills up (the first answers come one latency after the
# first calls), after it the last calls drain; neither says what the worker sustains.
STEADY_FROM, STEADY_TO = 0.1, 0.9
WATCH_SECONDS = 0.5


# ---------------------------------------------------------------------------------------------
# The load generator
#
# Clients are threads, each with its own keep-alive `http.client.HTTPConnection`. Of the
# obvious choices it costs the least CPU per request, which counts when the benchmark shares
# a small machine with the API and the database. Measured on the 2-core machine these
# figures were first taken on (3000 POSTs, 16 clients, a trivial asyncio server):
# http.client ~0.13 ms of client CPU per request, requests.Session ~0.6 ms, an asyncio
# httpx.AsyncClient ~1.35 ms. Threads suit a blocking client: each waits on its socket
# with the GIL released, and 16 threads is 16 requests in flight, exactly what is asked.


@dataclass
class LoadResult:
    requested: int
    started_wall: float = 0.0  # time.time() when the clock started, for database timestamps
    started: float = 0.0  # time.perf_counter() when the clock started
    finished: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    timed_out: bool = False

    @property
    def seconds(self) -> float:
        return max(self.finished - self.started, 1e-9)

    @property
    def accepted(self) -> int:
        return self.statuses.get(202, 0)


def job_body(index: int, tag: str) -> bytes:
    prompt = f"[{tag} {index}] Summarize the plot of Hamlet in one sentence."
    return json.dumps({"prompt": prompt, "model": MODEL}).encode()


def post_jobs(
    api_url: str,
    key: str,
    count: int,
    clients: int,
    tag: str,
    started: threading.Event | None = None,
    idempotent: bool = False,
) -> LoadResult:
    """`count` POST /v1/jobs from `clients` threads, timed from the moment all clients are
    connected and warm; each thread takes the next job number until none are left.
    `idempotent`: each job with an Idempotency-Key of its own, as retrying clients send."""
    parts = urlsplit(api_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    result = LoadResult(requested=count)
    counter = itertools.count()
    counter_lock = threading.Lock()
    # A floor of 10 jobs/s: far below anything sane, and it bounds a hung run.
    deadline_seconds = 60.0 + count / 10.0

    def start_clock() -> None:
        result.started_wall = time.time()
        result.started = time.perf_counter()
        if started is not None:
            started.set()

    barrier = threading.Barrier(clients, action=start_clock, timeout=60)
    # Set when post_jobs returns for any reason (Ctrl-C, SIGTERM in the main thread), so
    # that no client goes on posting at a stack that is being stopped.
    stop = threading.Event()
    per_thread: list[tuple[list[float], Counter[int], list[str], float]] = []
    per_thread_lock = threading.Lock()

    def run() -> None:
        client = HttpClient(host, port, timeout=REQUEST_TIMEOUT_SECONDS)
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        errors: list[str] = []
        try:
            for _ in range(WARMUP_PER_CLIENT):
                with contextlib.suppress(OSError, http.client.HTTPException):
                    client.request("GET", "/v1/jobs/job_warmup", None, headers)
            barrier.wait()
            deadline = result.started + deadline_seconds
            while time.perf_counter() < deadline and not stop.is_set():
                with counter_lock:
                    index = next(counter)
                if index >= count:
                    break
                body = job_body(index, tag)
                sent_headers = headers
                if idempotent:
                    sent_headers = {**headers, "Idempotency-Key": f"{tag}-{index}"}
                began = time.perf_counter()
                try:
                    status, content = client.request("POST", "/v1/jobs", body, sent_headers)
                except (OSError, http.client.HTTPException) as exc:
                    statuses[0] += 1
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - began
                statuses[status] += 1
                if status == 202:
                    latencies.append(elapsed)
                else:
                    errors.append(f"HTTP {status}: {content[:200]!r}")
        except threading.BrokenBarrierError:
            errors.append("a client never got ready (broken barrier)")
        except Exception as exc:  # recorded, so one bad thread cannot hide its reason
            barrier.abort()
            errors.append(f"client thread crashed: {type(exc).__name__}: {exc}")
        finally:
            client.close()
            with per_thread_lock:
                per_thread.append((latencies, statuses, errors, time.perf_counter()))

    threads = [
        threading.Thread(target=run, name=f"client-{i}", daemon=True) for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    join_deadline = time.monotonic() + 60 + deadline_seconds + REQUEST_TIMEOUT_SECONDS
    try:
        for thread in threads:
            thread.join(timeout=max(0.0, join_deadline - time.monotonic()))
    finally:
        stop.set()
        barrier.abort()
    result.timed_out = any(thread.is_alive() for thread in threads)
    with per_thread_lock:
        for latencies, statuses, errors, ended in per_thread:
            result.latencies.extend(latencies)
            result.statuses.update(statuses)
            result.errors.extend(errors)
            result.finished = max(result.finished, ended)
    if not result.started:  # the barrier never released
        result.started = result.finished = time.perf_counter()
    return result


@dataclass
class SendResult:
    sent: int
    seconds: float
    latencies: list[float]
    errors: list[str]

    @property
    def rate(self) -> float:
        return self.sent / max(self.seconds, 1e-9)


def raw_send_tasks(broker_url: str, count: int, clients: int) -> SendResult:
    """What the broker costs alone: `count` messages of a job's kind (the run-job task, one
    job id, normal priority) sent with plain Celery `send_task` from `clients` threads,
    through a Celery app built as the API builds its own (promptq.broker.celery_app), on the
    same Redis. Nothing is stored and no HTTP is spoken: intake's rate over this one says
    what promptq costs on top of publishing."""
    from promptq.broker import task_names
    from promptq.broker.celery_app import create_celery
    from promptq.config import Settings
    from promptq.priority import Priority

    app = create_celery(Settings(redis_url=broker_url, broker_url=broker_url))
    options = {"priority": Priority.NORMAL.broker_priority}
    counter = itertools.count()
    lock = threading.Lock()
    marks: dict[str, float] = {}
    per_thread: list[tuple[int, list[float], list[str]]] = []

    def start_clock() -> None:
        marks["started"] = time.perf_counter()

    barrier = threading.Barrier(clients, action=start_clock, timeout=60)

    def run() -> None:
        sent, latencies, errors = 0, [], []
        try:
            for index in range(WARMUP_PER_CLIENT):  # the producer pool's connections
                app.send_task(task_names.RUN_JOB, args=[f"job_warmup{index}"], **options)
            barrier.wait()
            while True:
                with lock:
                    index = next(counter)
                if index >= count:
                    break
                began = time.perf_counter()
                try:
                    app.send_task(task_names.RUN_JOB, args=[f"job_raw{index:026d}"], **options)
                except Exception as exc:  # counted, so one failure cannot hide the rest
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append(time.perf_counter() - began)
                sent += 1
        except threading.BrokenBarrierError:
            errors.append("a sender never got ready (broken barrier)")
        finally:
            with lock:
                per_thread.append((sent, latencies, errors))
                marks["finished"] = max(marks.get("finished", 0.0), time.perf_counter())

    threads = [
        threading.Thread(target=run, name=f"sender-{i}", daemon=True) for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60 + count / 10.0)
    barrier.abort()
    app.close()
    started = marks.get("started", 0.0)
    result = SendResult(0, marks.get("finished", started) - started, [], [])
    for sent, latencies, errors in per_thread:
        result.sent += sent
        result.latencies.extend(latencies)
        result.errors.extend(errors)
    return result


# ---------------------------------------------------------------------------------------------
# CPU accounting: who used the machine during a phase


class CpuMeter:
    """CPU seconds of our children, of this process (the clients and the simulator), and of
    every PostgreSQL and Redis server process on the machine, between `start` and `stop`.
    On a small machine they all share the same cores, so the split says where time went."""

    SERVER_NAMES = {"postgres": "PostgreSQL (all processes)", "redis-server": "Redis server"}
    OTHERS = "everything else on the machine"

    def __init__(self, children: dict[str, Child], postgres: bool) -> None:
        self.children = children
        self.servers = {"redis-server"} | ({"postgres"} if postgres else set())
        self.before: dict[str, float] = {}
        self.servers_before: dict[int, tuple[str, float]] = {}
        self.machine_before = 0.0
        self.used: dict[str, float] = {}
        self.wall = 0.0
        self._began = 0.0

    def _servers(self) -> dict[int, tuple[str, float]]:
        found: dict[int, tuple[str, float]] = {}
        for process in psutil.process_iter(["name", "cpu_times"]):
            name = process.info.get("name")
            times = process.info.get("cpu_times")
            if name in self.servers and times is not None:
                # children_*: the postmaster's reaped backends, so that the CPU of
                # connections closed during the phase is counted too.
                total = times.user + times.system + times.children_user + times.children_system
                found[process.pid] = (name, float(total))
        return found

    def _ours(self) -> dict[str, float]:
        ours = {name: cpu_seconds(child) for name, child in self.children.items()}
        ours["benchmark process (clients, simulator)"] = time.process_time()
        return ours

    @staticmethod
    def _machine_busy() -> float:
        times = psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    def start(self) -> None:
        self.machine_before = self._machine_busy()
        self.servers_before = self._servers()
        self.before = self._ours()
        self._began = time.perf_counter()

    def stop(self) -> None:
        self.wall = max(time.perf_counter() - self._began, 1e-9)
        for name, seconds in self._ours().items():
            self.used[name] = seconds - self.before[name]
        for pid, (name, seconds) in self._servers().items():
            # A server process born during the phase (a new connection's backend) counts
            # from zero; one that ended during it is in its parent's children_* times.
            _, earlier = self.servers_before.get(pid, (name, 0.0))
            label = self.SERVER_NAMES[name]
            self.used[label] = self.used.get(label, 0.0) + seconds - earlier
        # Whatever else ran meanwhile (another test run, a build): a large figure here
        # means the run shared the machine and its numbers are not to be trusted.
        busy = self._machine_busy() - self.machine_before
        self.used[self.OTHERS] = max(0.0, busy - sum(self.used.values()))

    def cores(self, name: str) -> float:
        return self.used.get(name, 0.0) / self.wall

    def rows(self) -> list[list[str]]:
        return [
            [name, f"{seconds:.1f} s", f"{seconds / self.wall:.2f}"]
            for name, seconds in sorted(self.used.items(), key=lambda item: -item[1])
        ]


# ---------------------------------------------------------------------------------------------
# Phases


@dataclass
class IntakeReport:
    rows: list[list[str]]
    cpu_rows: list[list[str]]
    notes: list[str]
    # Every job accepted, stored and published: what the exit status reflects. The
    # performance targets are only printed, never enforced.
    correct: bool


def run_intake(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    api_url: str,
    api: Child,
    database: DatabaseInfo,
    redis_url: str,
) -> IntakeReport:
    key_id, key = create_api_key(database.url, "bench-intake")
    engine = bench_engine(stack, database.url)
    log(f"intake: {args.jobs} jobs from {args.clients} clients, no worker running")
    meter = CpuMeter({"promptq api": api}, postgres=database.kind == "PostgreSQL")
    meter.start()
    load = post_jobs(
        api_url, key, args.jobs, args.clients, "intake", idempotent=args.idempotency_keys
    )
    meter.stop()
    stored = count_jobs(engine, key_id)
    queued_messages = broker_messages(redis_url)
    # No worker runs: everything published is still in the queue. Purge it, so no later
    # worker (ours in the next phase, or anyone's on this Redis db) runs these jobs.
    flush_redis(redis_url)
    log(f"intake: the same {args.jobs} messages with raw Celery send_task, {args.clients} threads")
    raw = raw_send_tasks(redis_url, args.jobs, args.clients)
    flush_redis(redis_url)

    rate = load.accepted / load.seconds
    p50 = percentile(load.latencies, 50) * 1000
    p99 = percentile(load.latencies, 99) * 1000
    api_ms_per_job = meter.used["promptq api"] / max(load.accepted, 1) * 1000
    max_ms = max(load.latencies, default=math.nan) * 1000
    raw_p50 = percentile(raw.latencies, 50) * 1000
    raw_p99 = percentile(raw.latencies, 99) * 1000
    stored_ok = stored == load.accepted == queued_messages
    rows = [
        [
            "Accepted jobs per second",
            f"{rate:.0f}",
            f"≥ {TARGET_INTAKE_RATE:.0f}",
            met(rate >= TARGET_INTAKE_RATE),
        ],
        ["Latency p50", f"{p50:.1f} ms", "", ""],
        [
            "Latency p99",
            f"{p99:.1f} ms",
            f"< {TARGET_INTAKE_P99_MS:.0f} ms",
            met(p99 < TARGET_INTAKE_P99_MS),
        ],
        ["Latency max", f"{max_ms:.1f} ms", "", ""],
        [
            "Raw Celery `send_task` per second (same Redis, same threads)",
            f"{raw.rate:.0f}",
            "",
            "",
        ],
        ["Raw `send_task` latency p50 / p99", f"{raw_p50:.2f} / {raw_p99:.2f} ms", "", ""],
        ["Intake rate / raw `send_task` rate", f"{rate / max(raw.rate, 1e-9):.2f}", "", ""],
        # Steadier than the rate from run to run, and what a change to the request path moves.
        ["API CPU per accepted job", f"{api_ms_per_job:.2f} ms", "", ""],
        [
            "Accepted (202) / sent",
            f"{load.accepted} / {load.requested}",
            "all",
            met(load.accepted == load.requested),
        ],
        [
            "Jobs stored / messages on the broker",
            f"{stored} / {queued_messages}",
            "all",
            met(stored_ok),
        ],
    ]
    notes = [f"Wall time {load.seconds:.2f} s."]
    if load.errors:
        notes.append(f"{len(load.errors)} errors; first: {load.errors[0]}")
    if raw.errors:
        notes.append(f"{len(raw.errors)} raw send_task errors; first: {raw.errors[0]}")
    if load.timed_out:
        notes.append("Some clients did not finish before the deadline.")
    correct = load.accepted == load.requested and stored_ok
    return IntakeReport(rows, meter.rows(), notes, correct)


@dataclass
class EndToEndReport:
    rows: list[list[str]]
    cpu_rows: list[list[str]]
    notes: list[str]
    failures: list[list[str]]
    correct: bool  # every job accepted and succeeded


class WorkerWatch:
    """Samples the worker every half second: its resident memory and its PostgreSQL
    connections (TCP connections to the database's port: what the server sees of it,
    whichever pool opened them). The maxima are what a deployment must provision."""

    def __init__(self, child: Child, database_port: int | None) -> None:
        self.process = psutil.Process(child.pid)
        self.database_port = database_port
        self.max_rss = 0
        self.max_database_connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self) -> None:
        self.max_rss = max(self.max_rss, self.process.memory_info().rss)
        if self.database_port is not None:
            connections = sum(
                1
                for connection in self.process.net_connections(kind="tcp")
                if connection.raddr and connection.raddr.port == self.database_port
            )
            self.max_database_connections = max(self.max_database_connections, connections)

    def _run(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            with contextlib.suppress(psutil.Error):
                self.sample()


def steady_rate(finished_at: list[float]) -> tuple[float, float]:
    """Jobs finished per second between the STEADY_FROM and STEADY_TO quantiles of their
    finishing times, and that window's length in seconds."""
    times = sorted(finished_at)
    if len(times) < 10:
        return math.nan, math.nan
    first, last = int(len(times) * STEADY_FROM), int(len(times) * STEADY_TO) - 1
    window = times[last] - times[first]
    return ((last - first) / window if window > 0 else math.nan), window


@dataclass
class TaskBaseline:
    """A worker's CPU for `messages` messages of one task that is not promptq's job."""

    messages: int
    cpu_seconds: float

    @property
    def ms_per_message(self) -> float:
        return self.cpu_seconds / max(self.messages, 1) * 1000


@dataclass(frozen=True)
class BaselineTask:
    module: str  # in bench/, for `celery -A`
    app: Celery  # the module's app, to publish with
    queue: str
    name: str


@dataclass
class Baselines:
    """What the `--latency 0` run compares a job's CPU with: the no-op task, and on
    PostgreSQL the floor (bench/_floor_app.py, the job's input and output with the drivers
    called directly) and the floor batched across jobs at each `--batched-floor` wait."""

    noop: TaskBaseline
    floor: TaskBaseline | None = None
    batched_floors: list[BatchedFloor] = field(default_factory=list)


@dataclass
class BatchedFloor:
    """The floor with its claims and records batched across jobs (`--batched-floor`)."""

    linger_ms: float
    baseline: TaskBaseline
    jobs_per_batch: float  # jobs a claim and a record held, on average


def run_baselines(
    args: argparse.Namespace, env: dict[str, str], workdir: Path, database: DatabaseInfo
) -> Baselines:
    """Each baseline's worker (and the floor's simulator) is stopped once it is measured,
    before the job's own run starts."""
    from _floor_app import FLOOR_QUEUE, FLOOR_TASK, floor_app
    from _noop_app import NOOP_QUEUE, NOOP_TASK, noop_app

    from promptq.config import Settings

    settings = Settings(redis_url=env["PROMPTQ_REDIS_URL"])
    ids = [f"job_baseline_{index}" for index in range(args.e2e_jobs)]
    log(f"baseline: {len(ids)} no-op Celery tasks")
    noop_task = BaselineTask("_noop_app", noop_app(settings), NOOP_QUEUE, NOOP_TASK)
    with contextlib.ExitStack() as stack:
        noop = run_task_baseline(args, stack, env, workdir, "noop-worker", noop_task, ids)
    if database.kind != "PostgreSQL":
        return Baselines(noop)
    floor_task = BaselineTask("_floor_app", floor_app(settings), FLOOR_QUEUE, FLOOR_TASK)
    floor, _ = run_floor(args, env, workdir, database, floor_task, ids, None)
    batched_floors = []
    for linger_ms in args.batched_floor or []:
        baseline, jobs_per_batch = run_floor(
            args, env, workdir, database, floor_task, ids, linger_ms
        )
        batched_floors.append(BatchedFloor(linger_ms, baseline, jobs_per_batch))
    return Baselines(noop, floor, batched_floors)


def run_floor(
    args: argparse.Namespace,
    env: dict[str, str],
    workdir: Path,
    database: DatabaseInfo,
    floor_task: BaselineTask,
    ids: list[str],
    linger_ms: float | None,
) -> tuple[TaskBaseline, float]:
    """The floor's worker CPU for `ids`, one job at a time or (with `linger_ms`) batched,
    and how many jobs a claim and a record held on average."""
    from promptq.simulator import Simulator, SimulatorConfig

    create_floor_jobs(database.url, ids)
    kind = "floor" if linger_ms is None else f"batched floor, {linger_ms:g} ms linger"
    log(f"baseline: {len(ids)} {kind} jobs (the drivers alone, bench/_floor_app.py)")
    with contextlib.ExitStack() as stack:
        # Served only once the worker is started (as in run_end_to_end): no thread of the
        # benchmark's own while it forks a child.
        simulator = Simulator(SimulatorConfig(latency=0))
        stack.callback(simulator.stop)
        floor_env = {
            **env,
            "FLOOR_DATABASE": make_url(database.url)
            .set(drivername="postgresql")
            .render_as_string(hide_password=False),
            "FLOOR_UPSTREAM_URL": simulator.url,
            **({} if linger_ms is None else {"FLOOR_BATCH_LINGER_MS": str(linger_ms)}),
        }
        name = "floor-worker" if linger_ms is None else f"batched-floor-{linger_ms:g}ms-worker"
        floor = run_task_baseline(
            args, stack, floor_env, workdir, name, floor_task, ids, simulator.start
        )
    succeeded, statements = remove_floor_jobs(database.url)
    if succeeded != len(ids):
        raise RuntimeError(f"the {kind} worker finished {succeeded} of its {len(ids)} jobs")
    return floor, 2 * succeeded / max(statements, 1)


def create_floor_jobs(database_url: str, ids: list[str]) -> None:
    """The floor's jobs, queued, each with a request like a benchmark job's (one short user
    message). A table of a run that was stopped midway (`--database-url` keeps it) goes
    first."""
    from _floor_app import CREATE_TABLE, FLOOR_TABLE

    request = json.dumps(
        {"model": MODEL, "max_tokens": 1024, "messages": [{"role": "user", "content": "Hi"}]}
    )
    with (
        contextlib.ExitStack() as engine_stack,
        bench_engine(engine_stack, database_url).begin() as connection,
    ):
        connection.execute(text(f"DROP TABLE IF EXISTS {FLOOR_TABLE}"))
        connection.execute(text(CREATE_TABLE))
        connection.execute(
            text(f"INSERT INTO {FLOOR_TABLE} (id, status, request) VALUES (:id, 'queued', :r)"),
            [{"id": job_id, "r": request} for job_id in ids],
        )


def remove_floor_jobs(database_url: str) -> tuple[int, int]:
    """How many of the floor's jobs succeeded, and in how many claims and records: the
    jobs a statement changed share its transaction's `now()`. Their table is dropped (a
    database given with `--database-url` is kept after the run)."""
    from _floor_app import FLOOR_TABLE

    with (
        contextlib.ExitStack() as engine_stack,
        bench_engine(engine_stack, database_url).begin() as connection,
    ):
        query = text(
            "SELECT count(*), count(DISTINCT claimed_at) + count(DISTINCT finished_at) "
            f"FROM {FLOOR_TABLE} WHERE status = 'succeeded'"
        )
        succeeded, statements = connection.execute(query).one()
        connection.execute(text(f"DROP TABLE {FLOOR_TABLE}"))
        return int(succeeded), int(statements)


def run_task_baseline(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    env: dict[str, str],
    workdir: Path,
    name: str,
    task: BaselineTask,
    ids: list[str],
    before_publishing: Callable[[], object] | None = None,
) -> TaskBaseline:
    """One task's cost to a worker built as promptq's, on the same Redis: one message per
    id published first, then drained, the worker's CPU counted from the first message to
    the queue's last acknowledgement."""
    queue = task.queue
    bench_dir = str(Path(__file__).resolve().parent)
    child = start_child(
        stack,
        name,
        [
            "-A",
            task.module,
            "worker",
            "-P",
            "gevent",
            f"--concurrency={args.concurrency}",
            f"--queues={queue}",
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            f"--hostname={name}-{uuid.uuid4().hex[:6]}@%h",
        ],
        {**env, "PYTHONPATH": bench_dir},
        workdir,
        module="celery",
    )
    broker = redis.Redis.from_url(env["PROMPTQ_REDIS_URL"])
    stack.callback(broker.close)
    # Ready when Celery has declared its queue binding in Redis.
    wait_until(lambda: broker.exists(f"_kombu.binding.{queue}") > 0, child, 60, name)
    if before_publishing is not None:
        before_publishing()
    time.sleep(1.0)
    before = cpu_seconds(child)
    with task.app.producer_or_acquire() as producer:
        for job_id in ids:
            task.app.send_task(task.name, args=[job_id], queue=queue, producer=producer)
    deadline = time.monotonic() + 60 + len(ids) / 100
    while time.monotonic() < deadline:
        child.check_alive()
        waiting = sum(broker.llen(name) for name in broker.keys(f"{queue}*"))
        if waiting == 0 and broker.hlen("unacked") == 0:
            break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"the {name} did not drain its queue in time")
    return TaskBaseline(len(ids), cpu_seconds(child) - before)


def run_end_to_end(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    api_url: str,
    api: Child,
    database: DatabaseInfo,
    env: dict[str, str],
    workdir: Path,
    baselines: Baselines | None = None,
) -> EndToEndReport:
    from promptq.simulator import Simulator, SimulatorConfig

    key_id, key = create_api_key(database.url, "bench-e2e")
    engine = bench_engine(stack, database.url)

    # The simulator binds its port at construction, so its URL is known now; its serving
    # thread starts only after the worker has been started, so that the benchmark holds no
    # threads of its own while it forks a child.
    simulator = Simulator(SimulatorConfig(latency=args.latency))
    stack.callback(simulator.stop)
    worker_env = {**env, "PROMPTQ_UPSTREAM_URL": simulator.url}
    log(f"end-to-end: starting one worker (concurrency {args.concurrency})")
    worker = start_worker(stack, worker_env, workdir, args.concurrency)
    simulator.start()
    port = make_url(database.url).port or 5432 if database.kind == "PostgreSQL" else None
    watch = WorkerWatch(worker, port)

    count = args.e2e_jobs
    ceiling = args.concurrency / args.latency if args.latency > 0 else math.inf
    # Ten times the time the worker's concurrency needs at the simulator's latency, plus a
    # minute: generous, yet a stuck run ends.
    timeout = 60.0 + 10.0 * count / min(ceiling, 1000.0)
    log(f"end-to-end: {count} jobs, simulator latency {args.latency:g} s, timeout {timeout:.0f} s")

    meter = CpuMeter(
        {"promptq worker": worker, "promptq api": api}, postgres=database.kind == "PostgreSQL"
    )
    started = threading.Event()
    load_box: list[LoadResult] = []
    submitter = threading.Thread(
        target=lambda: load_box.append(
            post_jobs(api_url, key, count, args.clients, "e2e", started)
        ),
        name="submitter",
        daemon=True,
    )
    submitter.start()
    if not started.wait(timeout=90):
        raise RuntimeError("the submitting clients never started")
    meter.start()
    watch.start()
    deadline = time.monotonic() + timeout
    finished = 0
    last_report = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        worker.check_alive()
        # One indexed count per half second (ix_jobs_key_status_id): negligible load.
        finished = count_jobs(engine, key_id, FINAL)
        if time.monotonic() - last_report >= 5:
            log(f"end-to-end: {finished}/{count} finished")
            last_report = time.monotonic()
        if finished >= count:
            break
        if not submitter.is_alive() and load_box and finished >= load_box[0].accepted:
            break  # some submissions failed; every accepted job is done
    meter.stop()
    watch.stop()
    submitter.join(timeout=REQUEST_TIMEOUT_SECONDS + 5)
    if not load_box:
        raise RuntimeError("the submitting clients did not finish")
    load = load_box[0]
    stats = simulator.stats()

    with engine.connect() as connection:
        summary = connection.execute(
            text(
                "SELECT status, count(*), max(finished_at), sum(attempts) FROM jobs"
                " WHERE api_key_id = :key GROUP BY status"
            ),
            {"key": key_id},
        ).all()
        failures = failed_jobs(connection, key_id)
        finish_times = [
            epoch(row[0])
            for row in connection.execute(
                text("SELECT finished_at FROM jobs WHERE api_key_id = :key AND status = :s"),
                {"key": key_id, "s": "succeeded"},
            )
        ]
    by_status = {row[0]: int(row[1]) for row in summary}
    attempts = sum(int(row[3] or 0) for row in summary)
    last_finished = max((epoch(row[2]) for row in summary if row[2] is not None), default=0.0)
    succeeded = by_status.get("succeeded", 0)
    # From the first submission (the clients' clock) to the last job's finished_at (the
    # worker's clock, the same machine's): exact, not rounded to the poll interval.
    seconds = last_finished - load.started_wall if last_finished else math.nan
    overall_rate = succeeded / seconds if seconds and seconds > 0 else 0.0
    rate, window = steady_rate(finish_times)
    worker_cores = meter.cores("promptq worker")
    worker_ms_per_job = meter.used["promptq worker"] / max(succeeded, 1) * 1000
    all_ok = succeeded == count and load.accepted == count
    targets = E2E_TARGETS.get((args.concurrency, args.latency), Targets())
    if args.latency == 0:
        targets = LATENCY_ZERO_TARGETS

    def row(name: str, value: float, shown: str, target: float | None, at_most: bool) -> list[str]:
        if target is None:
            return [name, shown, "", ""]
        sign = "≤" if at_most else "≥"
        return [
            name,
            shown,
            f"{sign} {target:g}",
            met(value <= target if at_most else value >= target),
        ]

    rss_mib = watch.max_rss / 2**20
    rows = [
        row("Jobs finished per second (steady state)", rate, f"{rate:.1f}", targets.rate, False),
        row(
            "Upstream calls in flight at once (simulator max)",
            stats["max_in_flight"],
            str(stats["max_in_flight"]),
            targets.in_flight,
            False,
        ),
        [
            "Worker CPU (CPU s / wall s)",
            f"{worker_cores:.2f} cores",
            f"< {TARGET_WORKER_CORES:.0f} core",
            met(worker_cores < TARGET_WORKER_CORES),
        ],
        row(
            "Worker CPU per job",
            worker_ms_per_job,
            f"{worker_ms_per_job:.2f} ms",
            targets.cpu_ms_per_job,
            True,
        ),
        row("Worker resident memory (max)", rss_mib, f"{rss_mib:.0f} MiB", targets.rss_mib, True),
    ]
    if port is not None:
        rows.append(
            row(
                "Worker PostgreSQL connections (max)",
                watch.max_database_connections,
                str(watch.max_database_connections),
                targets.postgres_connections,
                True,
            )
        )
    if baselines is not None:
        noop_ms = baselines.noop.ms_per_message
        ratio = worker_ms_per_job / max(noop_ms, 1e-9)
        rows.append(
            row(
                f"CPU per job / no-op task ({noop_ms:.2f} ms)",
                ratio,
                f"{ratio:.2f}x",
                targets.noop_ratio,
                True,
            )
        )
        if baselines.floor is not None:
            floor_ms = baselines.floor.ms_per_message
            rows.append(
                row(
                    f"Floor ({floor_ms:.2f} ms) / no-op task: the drivers alone",
                    floor_ms / max(noop_ms, 1e-9),
                    f"{floor_ms / max(noop_ms, 1e-9):.2f}x",
                    None,
                    True,
                )
            )
            rows.append(
                row(
                    "CPU per job / floor",
                    worker_ms_per_job / max(floor_ms, 1e-9),
                    f"{worker_ms_per_job / max(floor_ms, 1e-9):.2f}x",
                    None,
                    True,
                )
            )
        for batched in baselines.batched_floors:
            batched_ms = batched.baseline.ms_per_message
            rows.append(
                row(
                    f"Floor batched, {batched.linger_ms:g} ms linger, "
                    f"{batched.jobs_per_batch:.1f} jobs a statement ({batched_ms:.2f} ms) / "
                    "no-op task",
                    batched_ms / max(noop_ms, 1e-9),
                    f"{batched_ms / max(noop_ms, 1e-9):.2f}x",
                    None,
                    True,
                )
            )
    rows.append(["Succeeded / submitted", f"{succeeded} / {count}", "all", met(all_ok)])
    notes = [
        f"Steady state: the {STEADY_FROM:.0%} to {STEADY_TO:.0%} finishes, {window:.1f} s. "
        f"First submission to last job finished: {seconds:.2f} s ({overall_rate:.1f} jobs/s, "
        "with the ramp up to full concurrency and the drain); submitting took "
        f"{load.seconds:.2f} s ({load.accepted / load.seconds:.0f} jobs/s).",
        f"Ceiling at this concurrency and latency: {ceiling:.0f} jobs/s.",
        f"Upstream calls: {stats['calls']} ({describe_statuses(stats['by_status'])}); "
        f"attempts recorded: {attempts}.",
    ]
    if by_status.keys() - {"succeeded"}:
        notes.append(f"Jobs by status: {dict(sorted(by_status.items()))}.")
    if load.errors:
        notes.append(f"{len(load.errors)} submission errors; first: {load.errors[0]}")
    if finished < count and time.monotonic() >= deadline:
        notes.append(f"Timed out after {timeout:.0f} s with {finished}/{count} jobs finished.")
    return EndToEndReport(rows, meter.rows(), notes, failures, all_ok)


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="intake jobs (default 3000)")
    parser.add_argument("--e2e-jobs", type=int, default=1000, help="end-to-end jobs (default 1000)")
    parser.add_argument(
        "--clients", type=int, default=16, help="concurrent HTTP clients (default 16)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=100, help="worker greenlets (default 100)"
    )
    parser.add_argument(
        "--latency", type=float, default=1.0, help="simulated upstream seconds (default 1.0)"
    )
    add_store_options(
        parser, DEFAULT_REDIS_URL, "Redis for the broker, FLUSHED before and after the run"
    )
    parser.add_argument(
        "--idempotency-keys",
        action="store_true",
        help="intake: each job with an Idempotency-Key of its own",
    )
    parser.add_argument("--skip-intake", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--logs", type=Path, help="copy the API's and worker's logs here")
    parser.add_argument(
        "--noop-baseline",
        action="store_true",
        help="also measure a no-op Celery task's worker CPU and, on PostgreSQL, the floor's "
        "(bench/_floor_app.py; always with --latency 0)",
    )
    parser.add_argument(
        "--batched-floor",
        type=float,
        action="append",
        metavar="MS",
        help="with the baselines on PostgreSQL, also measure the floor with its claims and "
        "records batched across jobs, each batch waiting MS milliseconds for more jobs "
        "(repeat for several)",
    )
    args = parser.parse_args(argv)
    require_at_least_one(parser, args, ("jobs", "e2e_jobs", "clients", "concurrency"))
    if args.latency < 0:
        parser.error("--latency must be >= 0")
    if any(linger_ms < 0 for linger_ms in args.batched_floor or []):
        parser.error("--batched-floor must be >= 0 milliseconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    intake: IntakeReport | None = None
    e2e: EndToEndReport | None = None
    with bench_run(args, DEFAULT_REDIS_URL, logs=args.logs) as (stack, setup):
        env = stack_env(setup, write_limits_file(setup.workdir))
        if not (args.skip_intake and args.skip_e2e):
            api, api_url = start_api(stack, env, setup.workdir)
            log(f"API at {api_url} (pid {api.pid})")
            if not args.skip_intake:
                intake = run_intake(args, stack, api_url, api, setup.database, setup.redis.url)
            if not args.skip_e2e:
                baselines = None
                if args.latency == 0 or args.noop_baseline:
                    baselines = run_baselines(args, env, setup.workdir, setup.database)
                e2e = run_end_to_end(
                    args, stack, api_url, api, setup.database, env, setup.workdir, baselines
                )
    print_report(args, setup, intake, e2e)
    # Missed targets do not fail the run (they are figures to read); lost or failed jobs do.
    ok = all(report.correct for report in (intake, e2e) if report is not None)
    return 0 if ok else 1


def phase_section(
    heading: str, rows: list[list[str]], notes: list[str], cpu_title: str, cpu_rows: list[list[str]]
) -> list[str]:
    return [
        heading,
        "",
        markdown_table(["Measure", "Result", "Target", ""], rows),
        "",
        " ".join(notes),
        "",
        markdown_table([cpu_title, "CPU time", "Cores"], cpu_rows),
        "",
    ]


def print_report(
    args: argparse.Namespace,
    setup: Setup,
    intake: IntakeReport | None,
    e2e: EndToEndReport | None,
) -> None:
    out = report_start("Throughput", setup)
    if intake is not None:
        out += phase_section(
            f"### Intake: `POST /v1/jobs`, {args.jobs} jobs from {args.clients} concurrent "
            "clients, one API process, no worker"
            + (", each job with an Idempotency-Key" if args.idempotency_keys else ""),
            intake.rows,
            intake.notes,
            "CPU during intake",
            intake.cpu_rows,
        )
    if e2e is not None:
        out += phase_section(
            f"### End to end: {args.e2e_jobs} jobs, one worker process (concurrency "
            f"{args.concurrency}), simulated upstream at {args.latency:g} s",
            e2e.rows,
            e2e.notes,
            "CPU during end to end",
            e2e.cpu_rows,
        )
        out += failures_table(e2e.failures)
    print_markdown(out)


if __name__ == "__main__":
    sys.exit(main())
