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
code of promptq's can remove.

    python -m celery -A _floor_app worker -P gevent -Q bench-floor ...

Its environment names the database (FLOOR_DATABASE, a libpq connection string), the
simulator (FLOOR_UPSTREAM_URL) and the broker (PROMPTQ_REDIS_URL).
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import redis
import urllib3
from celery import Celery

from promptq.broker.celery_app import create_celery
from promptq.config import Settings

FLOOR_TASK = "bench.floor"
FLOOR_QUEUE = "bench-floor"
FLOOR_TABLE = "bench_floor_jobs"

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
                    shared.append(
                        Floor(
                            os.environ["FLOOR_DATABASE"],
                            settings.redis_url or "",
                            os.environ["FLOOR_UPSTREAM_URL"],
                        )
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
