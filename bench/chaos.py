"""promptq under chaos: jobs submitted through a stack whose processes are killed under load.

    .venv/bin/python bench/chaos.py                    # fresh PostgreSQL database, Redis db 12
    .venv/bin/python bench/chaos.py --sqlite           # a fresh SQLite file instead
    .venv/bin/python bench/chaos.py --seed 7 --logs /tmp/chaos-logs

The stack runs as a deployment runs it: one `promptq api` (uvicorn), `promptq beat` (the
sweeper, every 2 s) and three `promptq worker` processes (Celery, gevent pool, concurrency
32) are child processes; the upstream simulator (0.5-1 s per call) runs in this process.
Leases are short (claim 10 s, slot 5 s) so that recovery takes seconds, and rate limits are
far above the load, so that they never make a job wait.

Eight client threads submit `--jobs` jobs at `--rate` jobs per second, each with an
`Idempotency-Key`, resending the same request after a connection error or a 5xx until they
get a 2xx (202, or 200 when the job had already finished), as n8n and Zapier do. Meanwhile,
at random moments of the submission window, `--kills` processes are killed with SIGKILL: a
random worker (a new one is started at once) or the API (started again on the same port
after `--api-pause` seconds); and the broker's Redis database is wiped once (FLUSHDB).

Measured:
- lost jobs: accepted (a 2xx was received for them) but not `succeeded` once every job has
  finished or `--wait` seconds after the last submission;
- duplicate upstream calls: the simulator's calls for the run's prompts beyond one per job
  (every prompt is unique); only calls cut off by a worker kill may be repeated, so their
  bound is the sum of the calls in flight just before each kill (the simulator's `in_flight`,
  for the whole stack: a loose bound, the victim held only part of them);
- recovery of each disruption: from the disruption until every job of the run that was
  queued, running or retrying at that moment had finished (their `finished_at`); for an API
  kill, at least until the API answered /readyz again.

Everything started here is stopped, and the fresh database dropped, however the run ends
(ExitStack; every loop and wait has a deadline). Only 127.0.0.1 is contacted. Exit status 1
means a job was lost (or a job could not be submitted at all); missed targets are only
reported. Progress goes to stderr; stdout is Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import random
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from sqlalchemy import Engine, text

from promptq.redis_keys import published_marker

# Run as a script (`python bench/chaos.py`), the bench directory is on sys.path, not the
# repository; _stack and _report are imported as sibling modules either way.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, met, print_markdown, report_start
from _stack import (
    FAST_RECOVERY_SETTINGS,
    REPO,
    Child,
    HttpClient,
    Setup,
    add_store_options,
    bench_engine,
    bench_run,
    count_jobs,
    create_api_key,
    epoch,
    flush_redis,
    log,
    require_at_least_one,
    settings_text,
    stack_env,
    start_api,
    start_beat,
    start_worker,
    task_errors,
    write_limits_file,
)

from promptq.testing import FINAL

MODEL = "claude-sonnet-4-6"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
UNFINISHED = ("queued", "running", "retrying")
REQUEST_TIMEOUT_SECONDS = 10.0
# How long past the submission window the clients go on resending a job before giving up.
SUBMIT_GRACE_SECONDS = 120.0
POLL_SECONDS = 0.5
SWEEP_LINE = re.compile(r"sweep: (\d+) jobs taken back from dead workers, (\d+) re-published")

TARGET_LOST = 0
TARGET_RECOVERY_SECONDS = 60.0


# ---------------------------------------------------------------------------------------------
# Clients: paced submissions, each resent with its Idempotency-Key until a 2xx


@dataclass
class Acceptance:
    index: int
    job_id: str
    status: int  # 202, or 200 when the job had finished by the time a resent request came
    tries: int
    at: float  # time.time() of the 2xx


@dataclass
class Submissions:
    accepted: dict[int, Acceptance] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)  # gave up: index -> last error
    errors: Counter[str] = field(default_factory=Counter)  # what made a client resend
    requests: int = 0
    started: float = 0.0  # time.time() when the first job was due
    last_accepted: float = 0.0


def prompt_for(run_id: str, index: int) -> str:
    # Unique within its first 60 characters: the simulator counts calls per 60-char prefix.
    return f"chaos {run_id} job {index:05d}: summarize the plot of Hamlet in one sentence."


def _job_id(content: bytes) -> str | None:
    try:
        return str(json.loads(content)["id"])
    except (ValueError, KeyError, TypeError):
        return None


class Clients:
    """`clients` threads submitting job `i` no earlier than `started + i / rate`; each job is
    resent (same body, same Idempotency-Key) after a connection error, a timeout or a 5xx
    (and a 429) until a 2xx or the deadline."""

    def __init__(
        self,
        api_url: str,
        key: str,
        run_id: str,
        jobs: int,
        rate: float,
        clients: int,
        deadline_seconds: float,
    ) -> None:
        parts = urlsplit(api_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.key = key
        self.run_id = run_id
        self.jobs = jobs
        self.rate = rate
        self.deadline_seconds = deadline_seconds
        self.result = Submissions()
        self.stop = threading.Event()
        self._next = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, name=f"client-{i}", daemon=True)
            for i in range(clients)
        ]

    def start(self) -> None:
        self.result.started = time.time()
        self._deadline = time.monotonic() + self.deadline_seconds
        self._t0 = time.monotonic()
        for thread in self._threads:
            thread.start()

    def join(self, timeout: float) -> bool:
        """True when every client is done."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= self.jobs:
                return None
            self._next += 1
            return self._next - 1

    def _run(self) -> None:
        client = HttpClient(self.host, self.port, timeout=REQUEST_TIMEOUT_SECONDS)
        rng = random.Random()
        try:
            while not self.stop.is_set():
                index = self._take()
                if index is None:
                    return
                due = self._t0 + index / self.rate
                self.stop.wait(max(0.0, due - time.monotonic()))
                self._submit(client, rng, index)
        finally:
            client.close()

    def _submit(self, client: HttpClient, rng: random.Random, index: int) -> None:
        body = json.dumps({"prompt": prompt_for(self.run_id, index), "model": MODEL}).encode()
        headers = {
            "Authorization": f"Bearer {self.key}",
            "Content-Type": "application/json",
            "Idempotency-Key": f"chaos-{self.run_id}-{index}",
        }
        tries = 0
        last = "never sent"
        while not self.stop.is_set() and time.monotonic() < self._deadline:
            tries += 1
            try:
                status, content = client.request("POST", "/v1/jobs", body, headers)
            except (OSError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {exc}"
                self._count(type(exc).__name__)
            else:
                job_id = _job_id(content) if status in (200, 202) else None
                if job_id is not None:
                    with self._lock:
                        self.result.requests += 1
                        self.result.accepted[index] = Acceptance(
                            index, job_id, status, tries, time.time()
                        )
                        self.result.last_accepted = max(self.result.last_accepted, time.time())
                    return
                last = f"HTTP {status}: {content[:200]!r}"
                self._count(f"HTTP {status}")
                if status < 500 and status != 429:
                    break  # a request the API will never take: a bug, not an outage
            # What an integration platform does: wait a little, send the same request again.
            self.stop.wait(rng.uniform(0.2, 0.5))
        with self._lock:
            self.result.refused[index] = last

    def _count(self, kind: str) -> None:
        with self._lock:
            self.result.requests += 1
            self.result.errors[kind] += 1


# ---------------------------------------------------------------------------------------------
# The stack, with processes that can be killed and replaced


class Stack:
    """The API, beat and the workers, started through _stack (so that each is stopped when
    the ExitStack unwinds), plus kills. Children are started from the main thread only:
    PR_SET_PDEATHSIG fires when the thread that forked a child ends, not the process."""

    def __init__(
        self, exit_stack: contextlib.ExitStack, env: dict[str, str], workdir: Path, concurrency: int
    ) -> None:
        self.exit_stack = exit_stack
        self.env = env
        self.workdir = workdir
        self.concurrency = concurrency
        self.port = 0
        self.api: Child | None = None
        self.api_url = ""
        self.beat: Child | None = None
        self.workers: list[Child] = []
        self.everything: list[Child] = []  # every child ever started, for logs
        self.api_starts = 0
        self.worker_starts = 0

    def start_api(self) -> Child:
        name = f"api-{self.api_starts}"
        self.api_starts += 1
        api, self.api_url = start_api(
            self.exit_stack, self.env, self.workdir, port=self.port or None, name=name
        )
        self.port = urlsplit(self.api_url).port or 0
        self.api = api
        self.everything.append(api)
        return api

    def start_beat(self) -> Child:
        self.beat = start_beat(self.exit_stack, self.env, self.workdir)
        self.everything.append(self.beat)
        return self.beat

    def start_worker(self) -> Child:
        name = f"worker-{self.worker_starts}"
        self.worker_starts += 1
        worker = start_worker(self.exit_stack, self.env, self.workdir, self.concurrency, name)
        self.workers.append(worker)
        self.everything.append(worker)
        return worker

    @staticmethod
    def kill(child: Child) -> None:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)

    def running(self) -> list[Child]:
        return [c for c in [self.api, self.beat, *self.workers] if c is not None]


# ---------------------------------------------------------------------------------------------
# Disruptions


@dataclass
class Disruption:
    kind: str  # "worker", "api" or "flush"
    planned: float  # seconds after the first job was due
    at: float = 0.0  # time.time() just before it happened
    offset: float = 0.0  # `at`, in seconds after the first job was due
    target: str = ""
    in_flight: int = 0  # the simulator's calls in flight just before
    pending: list[str] = field(default_factory=list)  # unfinished jobs of the run then
    pending_by_status: dict[str, int] = field(default_factory=dict)
    api_back: float | None = None  # seconds until /readyz answered again (API kills)
    replaced_in: float | None = None  # seconds until the new worker was ready (worker kills)
    error: str | None = None
    # Filled in at the end.
    jobs_done: float | None = None  # seconds until every pending job had finished
    still_unfinished: int = 0

    @property
    def recovery(self) -> float | None:
        if self.jobs_done is None or self.error:
            return None
        return max(self.jobs_done, self.api_back or 0.0)


def plan(args: argparse.Namespace, rng: random.Random) -> list[Disruption]:
    """`--kills` kills (about a third of them the API's, at least one of each kind when
    there are two or more) and `--flushes` FLUSHDBs at random moments of the middle 80% of
    the submission window."""
    window = args.jobs / args.rate
    api_kills = args.api_kills
    if api_kills is None:
        api_kills = max(1, round(args.kills / 3)) if args.kills >= 2 else 0
    api_kills = min(api_kills, args.kills)
    kinds = ["api"] * api_kills + ["worker"] * (args.kills - api_kills) + ["flush"] * args.flushes
    rng.shuffle(kinds)
    times = sorted(rng.uniform(0.1 * window, 0.9 * window) for _ in kinds)
    return [Disruption(kind, planned) for kind, planned in zip(kinds, times, strict=True)]


def unfinished_jobs(engine: Engine, key_id: str) -> list[tuple[str, str]]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT id, status FROM jobs WHERE api_key_id = :key"
                " AND status IN ('queued', 'running', 'retrying')"
            ),
            {"key": key_id},
        ).all()
    return [(str(row[0]), str(row[1])) for row in rows]


def disrupt(
    event: Disruption,
    stack: Stack,
    engine: Engine,
    key_id: str,
    simulator: Any,
    redis_url: str,
    rng: random.Random,
    started: float,
    api_pause: float,
) -> None:
    pending = unfinished_jobs(engine, key_id)
    event.pending = [job_id for job_id, _ in pending]
    event.pending_by_status = dict(Counter(status for _, status in pending))
    if event.kind == "worker":
        victim = rng.choice(stack.workers)
        event.target = f"{victim.name} (pid {victim.pid})"
        event.in_flight = int(simulator.stats()["in_flight"])
        event.at = time.time()
        stack.kill(victim)
        stack.workers.remove(victim)
        replacement = stack.start_worker()
        event.replaced_in = time.time() - event.at
        event.target += f", replaced by {replacement.name}"
    elif event.kind == "api":
        assert stack.api is not None
        victim = stack.api
        event.target = f"{victim.name} (pid {victim.pid}), port {stack.port}"
        event.in_flight = int(simulator.stats()["in_flight"])
        event.at = time.time()
        stack.kill(victim)
        stack.api = None
        time.sleep(api_pause)
        restarted = stack.start_api()
        event.api_back = time.time() - event.at
        event.target += f", restarted as {restarted.name}"
    else:
        event.target = f"FLUSHDB {redis_url}"
        event.in_flight = int(simulator.stats()["in_flight"])
        event.at = time.time()
        flush_redis(redis_url)
    event.offset = event.at - started


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class JobRow:
    id: str
    status: str
    attempts: int
    finished_at: float | None
    updated_at: float | None
    error_type: str | None
    error_message: str | None
    next_attempt_at: float | None
    lease_expires_at: float | None
    waiting_for: str | None
    marker_ttl: int | None = None  # seconds left on its published marker (unfinished only)
    message: str = ""  # where its broker message is (unfinished only)


def job_rows(engine: Engine, key_id: str) -> dict[str, JobRow]:
    def ts(value: Any) -> float | None:
        return epoch(value) if value is not None else None

    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT id, status, attempts, finished_at, updated_at, error_type,"
                " error_message, next_attempt_at, lease_expires_at, waiting_for"
                " FROM jobs WHERE api_key_id = :key"
            ),
            {"key": key_id},
        ).all()
    return {
        str(r[0]): JobRow(
            str(r[0]),
            str(r[1]),
            int(r[2]),
            ts(r[3]),
            ts(r[4]),
            r[5],
            r[6],
            ts(r[7]),
            ts(r[8]),
            r[9],
        )
        for r in rows
    }


def attempt_rows(engine: Engine, key_id: str) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text(
                    "SELECT count(*) FROM attempts a JOIN jobs j ON a.job_id = j.id"
                    " WHERE j.api_key_id = :key"
                ),
                {"key": key_id},
            ).scalar_one()
        )


def marker_ttls(redis_url: str, job_ids: list[str]) -> dict[str, int]:
    """TTL of each job's published marker: -2 when there is none (the sweeper then takes its
    message for lost), else the seconds the sweeper will go on trusting it."""
    if not job_ids:
        return {}
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        with client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.ttl(published_marker(job_id))
            return {job_id: int(ttl) for job_id, ttl in zip(job_ids, pipe.execute(), strict=True)}
    finally:
        client.close()


def _key_contents(client: redis.Redis, key: bytes) -> list[bytes]:
    kind = client.type(key)
    value: Any
    if kind == b"list":
        value = client.lrange(key, 0, 100_000)
    elif kind == b"hash":
        value = [item for pair in client.hgetall(key).items() for item in pair]
    elif kind == b"zset":
        value = client.zrange(key, 0, 100_000)
    elif kind == b"set":
        value = list(client.smembers(key))
    elif kind == b"string":
        value = [client.get(key) or b""]
    else:
        value = []
    return [bytes(item) for item in value]


def message_whereabouts(
    redis_url: str, job_ids: list[str], children: list[Child], started: float
) -> dict[str, str]:
    """Where each job is in Redis (the run's own database): its message waiting in a queue,
    delivered to a worker and never acknowledged (kombu's `unacked` hash; which worker got
    it is found from the Celery task id in the logs), in a rate-limit queue, or nowhere but
    in its published marker."""
    if not job_ids:
        return {}
    places: dict[str, list[str]] = {job_id: [] for job_id in job_ids}
    markers = {published_marker(job_id).encode() for job_id in job_ids}
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        for number, key in enumerate(client.scan_iter(count=1000)):
            if number >= 100_000:
                break
            if key in markers or key == b"unacked":
                continue
            contents = _key_contents(client, key)
            for job_id in job_ids:
                if any(job_id.encode() in item for item in contents):
                    places[job_id].append(f"in {key.decode(errors='replace')}")
        # kombu's Redis transport: delivery tag -> [message, exchange, routing key], and
        # delivery tag -> when it was delivered.
        scores: Any = client.zrange("unacked_index", 0, -1, withscores=True)
        delivered = {tag: float(score) for tag, score in scores}
        unacked: Any = client.hgetall("unacked")
        for tag, raw in unacked.items():
            for job_id in job_ids:
                if job_id.encode() not in raw:
                    continue
                task_id = str(json.loads(raw)[0]["headers"].get("id", "?"))
                where = [
                    c.name
                    for c in children
                    if f"[{task_id}] received" in c.log_path.read_text(errors="replace")
                ]
                at = delivered.get(tag)
                places[job_id].append(
                    f"delivered to {', '.join(where) or 'a worker'}"
                    + (f" at {at - started:.2f} s" if at else "")
                    + f", never acknowledged (task {task_id[:8]})"
                )
    finally:
        client.close()
    return {
        job_id: "; ".join(found) or "nowhere in Redis (no message: delivered and lost?)"
        for job_id, found in places.items()
    }


def sweep_totals(children: list[Child]) -> tuple[int, int]:
    """(jobs taken back from dead workers, jobs re-published) over every sweep run, from the
    workers' logs (the sweep task runs on a worker; beat only schedules it)."""
    reclaimed = republished = 0
    for child in children:
        with contextlib.suppress(OSError):
            for match in SWEEP_LINE.finditer(child.log_path.read_text(errors="replace")):
                reclaimed += int(match.group(1))
                republished += int(match.group(2))
    return reclaimed, republished


@dataclass
class Outcome:
    run_id: str
    seed: int
    code: str = ""
    seconds: float = 0.0
    submissions: Submissions = field(default_factory=Submissions)
    disruptions: list[Disruption] = field(default_factory=list)
    jobs: dict[str, JobRow] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)  # job index -> upstream calls
    attempt_rows: int = 0
    reclaimed: int = 0
    republished: int = 0
    task_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    waited_until_all_final: bool = False

    @property
    def accepted_ids(self) -> set[str]:
        return {a.job_id for a in self.submissions.accepted.values()}

    def count(self, status: str) -> int:
        return sum(1 for job_id in self.accepted_ids if self.status_of(job_id) == status)

    def status_of(self, job_id: str) -> str:
        row = self.jobs.get(job_id)
        return row.status if row else "missing"

    @property
    def lost(self) -> list[str]:
        return sorted(j for j in self.accepted_ids if self.status_of(j) != "succeeded")

    @property
    def duplicates(self) -> int:
        return sum(max(0, n - 1) for n in self.calls.values())

    @property
    def bound(self) -> int:
        return sum(d.in_flight for d in self.disruptions if d.kind in ("worker", "api"))

    @property
    def bound_worker_kills(self) -> int:
        return sum(d.in_flight for d in self.disruptions if d.kind == "worker")

    @property
    def longest_recovery(self) -> float | None:
        values = [d.recovery for d in self.disruptions]
        if not values or any(v is None for v in values):
            return None
        return max(v for v in values if v is not None)


def finish_disruptions(outcome: Outcome) -> None:
    for event in outcome.disruptions:
        if not event.at:
            continue
        rows = [outcome.jobs.get(job_id) for job_id in event.pending]
        unfinished = [r for r in rows if r is None or r.status not in FINAL]
        event.still_unfinished = len(unfinished)
        if unfinished:
            event.jobs_done = None
            continue
        finished = [r.finished_at for r in rows if r is not None and r.finished_at is not None]
        event.jobs_done = max([f - event.at for f in finished] + [0.0])


# ---------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace, exit_stack: contextlib.ExitStack, setup: Setup) -> Outcome:
    from promptq.simulator import Simulator, SimulatorConfig

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    rng = random.Random(seed)
    outcome = Outcome(run_id=uuid.uuid4().hex[:8], seed=seed, code=code_version())
    workdir, redis_url = setup.workdir, setup.redis.url
    key_id, key = create_api_key(setup.database.url, "bench-chaos")
    engine = bench_engine(exit_stack, setup.database.url)

    # Binds now (its URL goes into the children's environment); serves once they started.
    simulator = Simulator(
        SimulatorConfig(latency=args.latency, latency_jitter=args.jitter, seed=seed)
    )
    exit_stack.callback(simulator.stop)
    env = stack_env(
        setup,
        write_limits_file(workdir),
        {"PROMPTQ_UPSTREAM_URL": simulator.url, **FAST_RECOVERY_SETTINGS},
    )
    stack = Stack(exit_stack, env, workdir, args.concurrency)
    api = stack.start_api()
    log(f"API at {stack.api_url} (pid {api.pid})")
    stack.start_beat()
    for _ in range(args.workers):
        worker = stack.start_worker()
        log(f"{worker.name} ready (pid {worker.pid})")
    simulator.start()

    disruptions = plan(args, rng)
    outcome.disruptions = disruptions
    window = args.jobs / args.rate
    log(
        f"run {outcome.run_id}, seed {seed}: {args.jobs} jobs at {args.rate:g}/s "
        f"(~{window:.0f} s), disruptions at "
        + ", ".join(f"{d.planned:.1f}s {d.kind}" for d in disruptions)
    )
    clients = Clients(
        stack.api_url,
        key,
        outcome.run_id,
        args.jobs,
        args.rate,
        args.clients,
        deadline_seconds=window + SUBMIT_GRACE_SECONDS,
    )
    began = time.monotonic()
    clients.start()
    try:
        for event in disruptions:
            # Sequential: one that comes due while another is still being restarted waits.
            delay = clients.result.started + event.planned - time.time()
            time.sleep(max(0.0, min(delay, window)))
            try:
                disrupt(
                    event,
                    stack,
                    engine,
                    key_id,
                    simulator,
                    redis_url,
                    rng,
                    clients.result.started,
                    args.api_pause,
                )
            except Exception as exc:  # recorded and reported; the run goes on
                event.error = f"{type(exc).__name__}: {str(exc)[:300]}"
                event.at = event.at or time.time()
                event.offset = event.at - clients.result.started
                log(f"disruption {event.kind} failed: {event.error}")
            log(
                f"{event.offset:6.1f}s {event.kind}: {event.target}; {event.in_flight} calls "
                f"in flight, {len(event.pending)} jobs unfinished"
            )
            if event.kind == "api" and stack.api is None:
                with contextlib.suppress(Exception):  # once more; else the clients give up
                    stack.start_api()
        if not clients.join(timeout=window + SUBMIT_GRACE_SECONDS + REQUEST_TIMEOUT_SECONDS + 30):
            outcome.notes.append("Some clients were still running at their deadline.")
    finally:
        clients.stop.set()
    submissions = clients.result
    outcome.submissions = submissions
    log(
        f"submitted: {len(submissions.accepted)} accepted, {len(submissions.refused)} given up "
        f"({submissions.requests} requests, errors {dict(submissions.errors)})"
    )

    # Every accepted job finished, or `--wait` seconds after the last submission.
    accepted = len(submissions.accepted)
    deadline = (submissions.last_accepted or time.time()) + args.wait
    last_report = 0.0
    finished = 0
    exited: set[str] = set()
    while time.time() < deadline:
        finished = count_jobs(engine, key_id, FINAL)
        if finished >= accepted:
            outcome.waited_until_all_final = True
            break
        if time.monotonic() - last_report >= 5:
            log(f"waiting: {finished}/{accepted} jobs finished")
            last_report = time.monotonic()
        for child in stack.running():
            if child.poll() is not None and child.name not in exited:
                exited.add(child.name)
                outcome.notes.append(f"{child.name} exited unexpectedly (code {child.returncode})")
        time.sleep(POLL_SECONDS)
    outcome.seconds = time.monotonic() - began
    log(f"{finished}/{accepted} jobs finished after {outcome.seconds:.0f} s")

    outcome.jobs = job_rows(engine, key_id)
    outcome.attempt_rows = attempt_rows(engine, key_id)
    by_prompt = simulator.stats()["calls_by_prompt"]
    outcome.calls = {
        i: int(by_prompt.get(prompt_for(outcome.run_id, i)[:60], 0)) for i in range(args.jobs)
    }
    unfinished = [r.id for r in outcome.jobs.values() if r.status not in FINAL]
    for job_id, ttl in marker_ttls(redis_url, unfinished).items():
        outcome.jobs[job_id].marker_ttl = ttl
    whereabouts = message_whereabouts(
        redis_url, unfinished, stack.everything, clients.result.started
    )
    for job_id, where in whereabouts.items():
        outcome.jobs[job_id].message = where
    outcome.reclaimed, outcome.republished = sweep_totals(stack.everything)
    outcome.task_errors = task_errors(stack.everything)
    finish_disruptions(outcome)
    stray = len(outcome.jobs) - len(outcome.accepted_ids)
    if stray:
        outcome.notes.append(
            f"{stray} jobs in the database for this run's key were never returned to a client "
            "(an Idempotency-Key that did not deduplicate?)"
        )
    if args.logs is not None:
        dump(args.logs, args, outcome)
    return outcome


def dump(target: Path, args: argparse.Namespace, outcome: Outcome) -> None:
    """What an investigation needs once the database is dropped: every disruption, every
    job that did not succeed (with its marker), and the jobs called more than once."""
    target.mkdir(parents=True, exist_ok=True)
    by_id = {a.job_id: a.index for a in outcome.submissions.accepted.values()}
    data = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "run_id": outcome.run_id,
        "seed": outcome.seed,
        "code": outcome.code,
        "started": outcome.submissions.started,
        "disruptions": [asdict(d) for d in outcome.disruptions],
        "not_succeeded": [asdict(outcome.jobs[j]) for j in outcome.lost if j in outcome.jobs],
        "refused": outcome.submissions.refused,
        "called_more_than_once": {
            job_id: {
                "index": index,
                "calls": outcome.calls.get(index, 0),
                "attempts": outcome.jobs[job_id].attempts if job_id in outcome.jobs else None,
            }
            for job_id, index in by_id.items()
            if outcome.calls.get(index, 0) > 1
        },
    }
    (target / "chaos.json").write_text(json.dumps(data, indent=1, default=str))


# ---------------------------------------------------------------------------------------------
# Report


def code_version() -> str:
    """The commit measured, and whether files outside bench/ differed from it (someone's
    work in progress changes what the children run)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        status = git(
            "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench"
        ).splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not status:
        return f"commit {commit}"
    return f"commit {commit} with uncommitted changes to {len(status)} files outside bench/"


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"


def print_report(
    args: argparse.Namespace, setup: Setup, outcome: Outcome | None, wall: float
) -> None:
    out = report_start("Chaos", setup)
    settings = settings_text(FAST_RECOVERY_SETTINGS)
    out += [
        f"{args.jobs} jobs at {args.rate:g} jobs/s from {args.clients} clients (each resent "
        "with its Idempotency-Key until a 2xx); one API process, beat, "
        f"{args.workers} workers (concurrency {args.concurrency}); simulated upstream "
        f"{args.latency:g}-{args.latency + args.jitter:g} s per call; {settings}.",
        "",
    ]
    if outcome is None:
        print_markdown(out)
        return
    subs = outcome.submissions
    accepted = len(subs.accepted)
    lost = outcome.lost
    kills = [d for d in outcome.disruptions if d.kind != "flush"]
    longest = outcome.longest_recovery
    unfinished = sum(1 for j in lost if outcome.status_of(j) in UNFINISHED)
    rows = [
        ["Jobs accepted (2xx)", f"{accepted} / {args.jobs}", "all", met(accepted == args.jobs)],
        ["… of which answered 200 (already finished)", str(outcome_200(subs)), "", ""],
        ["Jobs succeeded", str(outcome.count("succeeded")), "", ""],
        ["Jobs failed", str(outcome.count("failed")), "", ""],
        [
            "Jobs lost (accepted, not succeeded)",
            f"{len(lost)} ({unfinished} unfinished)",
            f"{TARGET_LOST}",
            met(len(lost) == TARGET_LOST),
        ],
        [
            "Duplicate upstream calls",
            str(outcome.duplicates),
            f"≤ {outcome.bound} (in flight at the kills)",
            met(outcome.duplicates <= outcome.bound),
        ],
        ["… calls in flight at the worker kills alone", str(outcome.bound_worker_kills), "", ""],
        [
            "Longest recovery",
            seconds(longest) if longest is not None else "**not recovered**",
            f"< {TARGET_RECOVERY_SECONDS:.0f} s",
            met(longest is not None and longest < TARGET_RECOVERY_SECONDS),
        ],
        [
            "Disruptions",
            f"{sum(d.kind == 'worker' for d in kills)} worker kills, "
            f"{sum(d.kind == 'api' for d in kills)} API kills, "
            f"{sum(d.kind == 'flush' for d in outcome.disruptions)} FLUSHDB",
            "",
            "",
        ],
    ]
    out += [markdown_table(["Measure", "Result", "Target", ""], rows), ""]

    table = []
    for number, d in enumerate(outcome.disruptions, 1):
        pending = ", ".join(f"{n} {s}" for s, n in sorted(d.pending_by_status.items())) or "0"
        done = seconds(d.jobs_done) if d.jobs_done is not None else f"{d.still_unfinished} never"
        extra = []
        if d.api_back is not None:
            extra.append(f"API back after {d.api_back:.1f} s")
        if d.replaced_in is not None:
            extra.append(f"new worker ready after {d.replaced_in:.1f} s")
        if d.error:
            extra.append(f"error: {d.error}")
        table.append(
            [
                str(number),
                f"{d.offset:.1f} s",
                {"worker": "kill -9 worker", "api": "kill -9 API", "flush": "FLUSHDB"}[d.kind],
                str(d.in_flight),
                pending,
                done,
                seconds(d.recovery) if d.recovery is not None else "**not recovered**",
                "; ".join([d.target, *extra]).replace("|", "/"),
            ]
        )
    out += [
        markdown_table(
            [
                "#",
                "At",
                "Disruption",
                "Calls in flight",
                "Jobs unfinished then",
                "All of them finished",
                "Recovery",
                "Detail",
            ],
            table,
        ),
        "",
    ]
    sum_attempts = sum(outcome.jobs[j].attempts for j in outcome.accepted_ids if j in outcome.jobs)
    notes = [
        f"Recovery of a disruption: from the moment it happened until every job of the run "
        f"that was queued, running or retrying then had finished (its `finished_at`); for an "
        f"API kill, at least until the API answered /readyz again ({args.api_pause:g} s pause "
        f"included). 'At' counts from the first submission.",
        f"Upstream calls: {sum(outcome.calls.values())} for {args.jobs} prompts; attempts "
        f"claimed {sum_attempts}, attempts recorded {outcome.attempt_rows} (the difference: "
        f"attempts cut off by a kill). The sweeper took back {outcome.reclaimed} jobs from "
        f"dead workers and re-published {outcome.republished}.",
        f"Clients sent {subs.requests} requests; resent after: "
        + (", ".join(f"{n} x {k}" for k, n in subs.errors.most_common()) or "nothing")
        + ".",
        f"Run {outcome.run_id}, seed {outcome.seed} (`--seed {outcome.seed}` repeats the "
        f"schedule), code: {outcome.code}; {outcome.seconds:.0f} s from the first submission "
        f"to the end of the wait, {wall:.0f} s in all.",
    ]
    if not outcome.waited_until_all_final:
        notes.append(f"Not every accepted job finished within {args.wait:g} s of the last one.")
    if subs.refused:
        first = next(iter(subs.refused.items()))
        notes.append(f"{len(subs.refused)} jobs never accepted; job {first[0]}: {first[1]}")
    if outcome.task_errors:
        notes.append(f"{len(outcome.task_errors)} task errors; first: {outcome.task_errors[0]}")
    notes += outcome.notes
    out += [" ".join(notes), ""]
    if lost:
        rows = []
        for job_id in lost[:10]:
            r = outcome.jobs.get(job_id)
            if r is None:
                rows.append([job_id, "missing", "", "", "", "", ""])
                continue
            rows.append(
                [
                    r.id,
                    r.status + (f" (waiting for {r.waiting_for})" if r.waiting_for else ""),
                    str(r.attempts),
                    f"{r.updated_at - subs.started:.1f} s" if r.updated_at else "",
                    "" if r.marker_ttl is None else str(r.marker_ttl),
                    r.message,
                    f"{r.error_type or ''} {(r.error_message or '')[:80]}".strip().replace(
                        "|", "/"
                    ),
                ]
            )
        out += [
            markdown_table(
                [
                    f"Job not succeeded (first {len(rows)} of {len(lost)})",
                    "Status",
                    "Attempts",
                    "Last updated at",
                    "Marker TTL (s)",
                    "Its message",
                    "Error",
                ],
                rows,
            ),
            "",
        ]
    print_markdown(out)


def outcome_200(subs: Submissions) -> int:
    return sum(1 for a in subs.accepted.values() if a.status == 200)


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs submitted (default 1000)")
    parser.add_argument(
        "--rate", type=float, default=20.0, help="jobs submitted per second (default 20)"
    )
    parser.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs (default 10)")
    parser.add_argument(
        "--api-kills", type=int, help="of which of the API (default: a third, at least one)"
    )
    parser.add_argument("--flushes", type=int, default=1, help="FLUSHDBs of the broker (1)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    parser.add_argument("--concurrency", type=int, default=32, help="threads per worker (32)")
    parser.add_argument(
        "--latency", type=float, default=0.5, help="simulated upstream seconds (default 0.5)"
    )
    parser.add_argument(
        "--jitter", type=float, default=0.5, help="plus up to this many seconds (default 0.5)"
    )
    parser.add_argument(
        "--api-pause", type=float, default=1.0, help="seconds the API stays dead (default 1)"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=180.0,
        help="seconds after the last submission for every job to finish (default 180)",
    )
    parser.add_argument("--seed", type=int, help="for the schedule, victims and latencies")
    parser.add_argument(
        "--logs", type=Path, help="copy the logs and a chaos.json of the run's details here"
    )
    add_store_options(
        parser, DEFAULT_REDIS_URL, "Redis for the broker, FLUSHED before, during and after the run"
    )
    args = parser.parse_args(argv)
    require_at_least_one(parser, args, ("jobs", "clients", "workers", "concurrency"))
    for name in ("kills", "flushes", "latency", "jitter", "api_pause", "wait"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.rate <= 0:
        parser.error("--rate must be > 0")
    if args.api_kills is not None and not 0 <= args.api_kills <= args.kills:
        parser.error("--api-kills must be between 0 and --kills")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    outcome: Outcome | None = None
    with bench_run(args, DEFAULT_REDIS_URL, prefix="promptq-chaos-", logs=args.logs) as (
        stack,
        setup,
    ):
        outcome = run(args, stack, setup)
    print_report(args, setup, outcome, time.monotonic() - began)
    if outcome is None:
        return 1
    # Missed targets are only reported; a lost job (or one never accepted) fails the run.
    return 1 if outcome.lost or outcome.submissions.refused else 0


if __name__ == "__main__":
    sys.exit(main())
