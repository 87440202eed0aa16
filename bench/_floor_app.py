"""The floor of bench/throughput.py's `--latency 0` run: the least a job's path can cost a
worker with the libraries promptq runs on, measured beside the no-op task (bench/_noop_app.py)
and promptq's own job.

A Celery app built exactly as promptq's, on the same Redis, with one task that does only the
input and output every job needs, each with the driver called directly and nothing of
promptq's between:

- the claim: one UPDATE ... RETURNING the request, in autocommit (psycopg);
- admission by the rate limiter: one Lua script call (redis-py);
- the upstream call: one POST to the simulator on a kept-alive connection (urllib3), its
  JSON answer parsed;
- the record: one UPDATE of the job's row with the answer and its usage, in autocommit;
- the limiter's settlement and the word to waiting clients, pipelined in one round trip.

No SQL compilation, no ORM session, no retries, no rollups, no logging, no webhooks, no
leases: a lower bound, not something promptq could ship. What promptq's job costs above it is
what its guarantees and its code cost; what the floor costs above the no-op task is what no
code of promptq's can remove while it runs each job's round trips on their own.

With FLOOR_BATCH_LINGER_MS set, the same work with the claims and the records batched
across jobs (BatchedFloor): what would be left of the floor if promptq batched them.

    python -m celery -A _floor_app worker -P gevent -Q bench-floor ...

Its environment names the database (FLOOR_DATABASE, a libpq connection string), the
simulator (FLOOR_UPSTREAM_URL), the broker (PROMPTQ_REDIS_URL) and, for the batched form,
how long a batch waits for more jobs (FLOOR_BATCH_LINGER_MS).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import psycopg
import redis
import urllib3
from celery import Celery

from promptq.broker.celery_app import create_celery
from promptq.config import Settings

FLOOR_TASK = "bench.floor"
FLOOR_QUEUE = "bench-floor"
FLOOR_TABLE = "bench_floor_jobs"

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")

# A limiter's acquire and settle, reduced to one key each: what a script call costs.
ACQUIRE = "return redis.call('INCR', KEYS[1])"
SETTLE = "return redis.call('DECR', KEYS[1])"

CREATE_TABLE = f"""
CREATE TABLE {FLOOR_TABLE} (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    request JSONB NOT NULL,
    result JSONB,
    input_tokens INTEGER,
    output_tokens INTEGER,
    claimed_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ
)"""
CLAIM = f"""
UPDATE {FLOOR_TABLE} SET status = 'running', attempts = attempts + 1, claimed_at = now()
WHERE id = %s AND status = 'queued' RETURNING request"""
RECORD = f"""
UPDATE {FLOOR_TABLE} SET status = 'succeeded', result = %s, input_tokens = %s,
    output_tokens = %s, finished_at = now()
WHERE id = %s AND status = 'running'"""


class Floor:
    """What the task's runs share, as a worker shares its pools: connections to the
    database (as many as the worker's concurrency needs, at most 20, as promptq's), to Redis
    and to the simulator."""

    def __init__(self, database: str, redis_url: str, upstream_url: str) -> None:
        self._database = database
        self._connections: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
        self._opened = 0
        self.redis = redis.Redis.from_url(redis_url)
        self.acquire = self.redis.register_script(ACQUIRE)
        # Loaded once, then called by its digest: in a pipeline, redis-py's script objects
        # ask SCRIPT EXISTS first, a round trip more every time (promptq.ratelimit.limiter
        # calls its scripts the same way).
        self.settle_sha = self.redis.script_load(SETTLE)
        self.http = urllib3.PoolManager(maxsize=1000)
        self.url = f"{upstream_url.rstrip('/')}/v1/messages"
        self.headers = {
            "content-type": "application/json",
            "x-api-key": os.environ.get("PROMPTQ_UPSTREAM_API_KEY", "sk-bench"),
            "anthropic-version": "2023-06-01",
        }

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            connection = self._connections.get_nowait()
        except queue.Empty:
            if self._opened < 20:
                self._opened += 1
                connection = psycopg.connect(self._database, autocommit=True)
            else:
                connection = self._connections.get()
        try:
            yield connection
        finally:
            self._connections.put(connection)

    def run(self, job_id: str) -> None:
        with self.connection() as connection:
            row = connection.execute(CLAIM, (job_id,), prepare=True).fetchone()
        if row is None:
            return
        self.acquire(keys=["floor-limiter:in-flight"])
        response = self.http.request(
            "POST", self.url, body=json.dumps(row[0]).encode(), headers=self.headers
        )
        if response.status != 200:
            # Left running: the benchmark counts the floor's succeeded jobs.
            raise RuntimeError(f"the simulator answered {response.status}")
        message = json.loads(response.data)
        usage = message.get("usage") or {}
        with self.connection() as connection:
            connection.execute(
                RECORD,
                (
                    json.dumps(message),
                    usage.get("input_tokens"),
                    usage.get("output_tokens"),
                    job_id,
                ),
                prepare=True,
            )
        pipeline = self.redis.pipeline(transaction=False)
        pipeline.evalsha(self.settle_sha, 1, "floor-limiter:in-flight")
        pipeline.publish(f"floor-finished:{job_id}", "succeeded")
        pipeline.execute()


# ---------------------------------------------------------------------------------------------
# The floor with its round trips shared between jobs


class Combiner(Generic[Item, Outcome]):
    """Group commit, written here because it is only a benchmark's measure: the first
    caller to find no batch under way becomes its writer. It waits `linger` seconds
    (other greenlets queue meanwhile), runs every item queued by then as one call of
    `flush`, and goes on until none is left; the others wait for their outcome. A failed
    batch raises its error in every caller waiting on it and in those queued behind it."""

    def __init__(self, flush: Callable[[list[Item]], list[Outcome]], linger: float) -> None:
        self._flush = flush
        self._linger = linger
        self._pending: list[tuple[Item, Future[Outcome]]] = []
        self._flushing = False

    def submit(self, item: Item) -> Outcome:
        outcome: Future[Outcome] = Future()
        self._pending.append((item, outcome))
        if not self._flushing:
            self._flushing = True
            try:
                while self._pending:
                    # The process is gevent's (celery -P gevent): this sleep lets the other
                    # greenlets run and queue their items.
                    time.sleep(self._linger)
                    self._run_batch()
            finally:
                self._flushing = False
        return outcome.result()

    def _run_batch(self) -> None:
        batch, self._pending = self._pending, []
        try:
            outcomes = self._flush([item for item, _ in batch])
        except Exception as error:
            for _, waiting in batch + self._pending:
                waiting.set_exception(error)
            self._pending = []
            return
        for (_, waiting), outcome in zip(batch, outcomes, strict=True):
            waiting.set_result(outcome)


BATCH_CLAIM = f"""
UPDATE {FLOOR_TABLE} SET status = 'running', attempts = attempts + 1, claimed_at = now()
WHERE id = ANY(%s) AND status = 'queued' RETURNING id, request"""
BATCH_RECORD = f"""
UPDATE {FLOOR_TABLE} AS job SET status = 'succeeded', result = answer.result::jsonb,
    input_tokens = answer.input_tokens, output_tokens = answer.output_tokens,
    finished_at = now()
FROM (SELECT unnest(%s::text[]) AS id, unnest(%s::text[]) AS result,
             unnest(%s::int[]) AS input_tokens, unnest(%s::int[]) AS output_tokens) AS answer
WHERE job.id = answer.id AND job.status = 'running'"""
ACQUIRE_MANY = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
SETTLE_MANY = "return redis.call('DECRBY', KEYS[1], ARGV[1])"


class BatchedFloor(Floor):
    """The floor with every round trip but the upstream call shared between jobs: one
    claim with its admission, and one record with its settlement and words, for all the
    jobs that reached that step within `linger` seconds of the batch's first. What the
    least a job's path costs would be if promptq batched its statements and Redis calls
    across jobs, at the price of that wait on every job. (Without the wait, at
    `--latency 0` a batch holds little more than one job: the worker's messages arrive
    one by one, and each batch's round trip ends before the next job gets there.)"""

    def __init__(self, database: str, redis_url: str, upstream_url: str, linger: float) -> None:
        super().__init__(database, redis_url, upstream_url)
        self.acquire_many_sha = self.redis.script_load(ACQUIRE_MANY)
        self.settle_many_sha = self.redis.script_load(SETTLE_MANY)
        self.claims: Combiner[str, Any] = Combiner(self._claim, linger)
        self.records: Combiner[tuple[str, dict[str, Any]], None] = Combiner(self._record, linger)

    def _claim(self, job_ids: list[str]) -> list[Any]:
        with self.connection() as connection:
            rows = connection.execute(BATCH_CLAIM, (job_ids,), prepare=True).fetchall()
        self.redis.evalsha(self.acquire_many_sha, 1, "floor-limiter:in-flight", len(rows))
        requests = dict(rows)
        return [requests.get(job_id) for job_id in job_ids]

    def _record(self, answers: list[tuple[str, dict[str, Any]]]) -> list[None]:
        usages = [message.get("usage") or {} for _, message in answers]
        with self.connection() as connection:
            connection.execute(
                BATCH_RECORD,
                (
                    [job_id for job_id, _ in answers],
                    [json.dumps(message) for _, message in answers],
                    [usage.get("input_tokens") for usage in usages],
                    [usage.get("output_tokens") for usage in usages],
                ),
                prepare=True,
            )
        pipeline = self.redis.pipeline(transaction=False)
        pipeline.evalsha(self.settle_many_sha, 1, "floor-limiter:in-flight", len(answers))
        for job_id, _ in answers:
            pipeline.publish(f"floor-finished:{job_id}", "succeeded")
        pipeline.execute()
        return [None] * len(answers)

    def run(self, job_id: str) -> None:
        request = self.claims.submit(job_id)
        if request is None:
            return
        response = self.http.request(
            "POST", self.url, body=json.dumps(request).encode(), headers=self.headers
        )
        if response.status != 200:
            raise RuntimeError(f"the simulator answered {response.status}")
        self.records.submit((job_id, json.loads(response.data)))


def floor_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    celery = create_celery(settings)
    # promptq's tasks are not this worker's business.
    celery.conf.include = []
    shared: list[Floor] = []
    # The first messages' greenlets wait here for one build rather than each building its
    # own (gevent's lock: `python -m celery` patches the process before it loads the app).
    building = threading.Lock()

    def floor() -> Floor:
        # Built in the worker, on the first message: the command line's `-P gevent` has
        # patched the process by then.
        if not shared:
            with building:
                if not shared:
                    ends = (
                        os.environ["FLOOR_DATABASE"],
                        settings.redis_url or "",
                        os.environ["FLOOR_UPSTREAM_URL"],
                    )
                    linger_ms = os.environ.get("FLOOR_BATCH_LINGER_MS")
                    shared.append(
                        Floor(*ends)
                        if linger_ms is None
                        else BatchedFloor(*ends, linger=float(linger_ms) / 1000)
                    )
        return shared[0]

    @celery.task(name=FLOOR_TASK, ignore_result=True, acks_late=True)
    def run_floor_job(job_id: str, **_: Any) -> None:
        floor().run(job_id)

    return celery


def __getattr__(name: str) -> Celery:
    # `celery -A _floor_app` looks for the module's `app`: built then, from the worker's
    # environment (the benchmark imports this module with none).
    if name == "app":
        return floor_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
