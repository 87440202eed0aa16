"""What one job costs the database and Redis on its way through a worker: SQL statements and
transactions counted by SQLAlchemy's engine events, Redis round trips by a counting wrapper
around redis-py's connection send (kombu talks to Redis through redis-py too), against the
real databases, a real Redis and the simulator over HTTP.

The job runs in-process through promptq.jobs.runner.JobRunner, with the worker's own parts
(the Redis limiter, the lease keeper, the broker messenger over a Celery app): from the
worker receiving the job's message to its end recorded. Its intake side (the publish marker
and the message, promptq.broker.publish) is counted apart. Celery's own consume and ack of
the message, and the task events a worker sends, belong to the transport and are counted by
test_celery_transport_round_trips, with a Celery worker in this process.

The lean path is a key without a budget or an rpm, granted at once by the limiter:
- without a webhook: at most 4 statements in at most 2 transactions;
- with one (the job's target_url and a subscription of its key): at most 6 statements;
- in Redis, at most 6 round trips in all, intake included.
PostgreSQL (production) meets these. SQLite has no data-modifying CTE, which is what folds the
attempt row, the job's end, its rollups and its spend into one statement on PostgreSQL: there
they are one statement each (LEAN_SQLITE_EXTRA more), in the same two transactions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
import redis
import redis.connection
from helpers import unique
from sqlalchemy import event

from promptq.broker.celery_app import create_celery
from promptq.broker.messenger import BrokerMessenger
from promptq.broker.publish import publish_job
from promptq.config import Settings
from promptq.db import get_engine, session_scope
from promptq.jobs import service
from promptq.jobs.leases import LeaseKeeper
from promptq.jobs.runner import JobRunner
from promptq.jobspec.schemas import JobCreate
from promptq.keys.service import authenticate
from promptq.models import Job
from promptq.pricing import PriceTable
from promptq.ratelimit.limiter import RedisLimiter
from promptq.ratelimit.table import LimitTable
from promptq.redis_roles import client_for
from promptq.testing import SONNET
from promptq.upstream import UpstreamClient
from promptq.webhooks import subscriptions

LEAN_STATEMENTS = 4
LEAN_TRANSACTIONS = 2
WEBHOOK_STATEMENTS = 6
REDIS_ROUND_TRIPS = 6
# SQLite runs the attempt row, the job's end, its two rollups and its spend as one statement
# each where PostgreSQL runs one (see the module's docstring).
LEAN_SQLITE_EXTRA = 2


@dataclass
class Tally:
    statements: list[str] = field(default_factory=list)
    begins: int = 0
    commits: int = 0
    checkouts: int = 0
    pings: int = 0
    # Each Redis round trip as the commands it carried (a pipeline carries several).
    redis: list[list[str]] = field(default_factory=list)

    def reset(self) -> None:
        self.statements.clear()
        self.redis.clear()
        self.begins = self.commits = self.checkouts = self.pings = 0

    def describe(self) -> str:
        shown = "\n  ".join(s.split("\n")[0][:110] for s in self.statements)
        trips = "; ".join(" ".join(trip) for trip in self.redis)
        return (
            f"{len(self.statements)} statements in {self.begins} transactions "
            f"({self.commits} commits, {self.checkouts} checkouts, {self.pings} pings), "
            f"{len(self.redis)} Redis round trips [{trips}]:\n  {shown}"
        )


def _command_names(packed: Any) -> list[str]:
    """The command names of a packed RESP request (one, or a pipeline's several)."""
    chunks = packed if isinstance(packed, list | tuple) else [packed]
    data = b"".join(bytes(chunk) for chunk in chunks)
    names: list[str] = []
    lines = data.split(b"\r\n")
    index = 0
    while index < len(lines):
        if lines[index].startswith(b"*") and index + 2 < len(lines):
            names.append(lines[index + 2].decode(errors="replace").upper())
            count = int(lines[index][1:])
            index += 1 + 2 * count
        else:
            index += 1
    return names


@pytest.fixture
def tally(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Tally]:
    counted = Tally()
    engine = get_engine(database_url)

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        counted.statements.append(statement)

    def on_begin(_conn: Any) -> None:
        counted.begins += 1

    def on_commit(_conn: Any) -> None:
        counted.commits += 1

    def on_checkout(*_: Any) -> None:
        counted.checkouts += 1

    listeners = [
        (engine, "before_cursor_execute", on_statement),
        (engine, "begin", on_begin),
        (engine, "commit", on_commit),
        (engine.pool, "checkout", on_checkout),
    ]
    for target, name, listener in listeners:
        event.listen(target, name, listener)
    do_ping = engine.dialect.do_ping

    def counting_ping(dbapi_connection: Any) -> bool:
        counted.pings += 1
        return bool(do_ping(dbapi_connection))

    monkeypatch.setattr(engine.dialect, "do_ping", counting_ping)
    send = redis.connection.AbstractConnection.send_packed_command

    def counting_send(self: Any, command: Any, check_health: bool = True) -> None:
        counted.redis.append(_command_names(command))
        send(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting_send)
    yield counted
    for target, name, listener in listeners:
        event.remove(target, name, listener)


@dataclass
class Worker:
    settings: Settings
    runner: JobRunner
    app: Any
    leases: LeaseKeeper


@pytest.fixture
def worker(quiet_env: dict[str, str], database_url: str, simulator: Any) -> Iterator[Worker]:
    """The worker's parts, built as worker.context builds them, on a Redis database no
    worker process consumes (so the messages the job's path sends stay where they are)."""
    settings = Settings(
        database_url=database_url,
        redis_url=quiet_env["PROMPTQ_REDIS_URL"],
        upstream_url=simulator.url,
        upstream_api_key=quiet_env["PROMPTQ_UPSTREAM_API_KEY"],
        limits_file=quiet_env["PROMPTQ_LIMITS_FILE"],
    )
    app = create_celery(settings)
    limiter = RedisLimiter(
        client_for(settings, "limiter"),
        LimitTable.load(settings.limits_file),
        slot_lease_seconds=settings.slot_lease_seconds,
    )
    leases = LeaseKeeper(settings, limiter)
    limiter.running_calls = leases.running_calls
    runner = JobRunner(
        settings,
        PriceTable.load(settings.pricing_file),
        UpstreamClient(settings.upstream_url, settings.upstream_key, timeout=10),
        limiter,
        leases,
        BrokerMessenger(app, client_for(settings, "events")),
    )
    yield Worker(settings, runner, app, leases)
    leases.stop()


def submit(worker: Worker, plain: str, **extra: Any) -> str:
    """A job stored as the API stores it (its message is sent apart, and counted)."""
    with session_scope(worker.settings) as session:
        key = authenticate(session, plain)
        assert key is not None
        body = {"prompt": unique("counted"), "model": SONNET, "max_tokens": 16, **extra}
        return service.create_job(
            session, worker.settings, key, JobCreate.model_validate(body)
        ).job.id


@dataclass
class JobCounts:
    intake: Tally
    worker: Tally


def run_counted(worker: Worker, tally: Tally, plain: str, **extra: Any) -> JobCounts:
    job_id = submit(worker, plain, **extra)
    tally.reset()
    publish_job(worker.app, job_id)
    intake = Tally(redis=list(tally.redis))
    tally.reset()
    outcome = worker.runner.run(job_id)
    counted = Tally(
        statements=list(tally.statements),
        begins=tally.begins,
        commits=tally.commits,
        checkouts=tally.checkouts,
        pings=tally.pings,
        redis=list(tally.redis),
    )
    assert outcome == "succeeded", outcome
    with session_scope(worker.settings) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "succeeded" and job.cost_total is not None
    return JobCounts(intake, counted)


def report(kind: str, database_url: str, counts: JobCounts) -> str:
    database = database_url.split(":", 1)[0]
    text = (
        f"{kind} on {database}: worker {counts.worker.describe()}\n"
        f"  intake: {len(counts.intake.redis)} Redis round trips "
        f"[{'; '.join(' '.join(t) for t in counts.intake.redis)}]"
    )
    print(text)
    return text


def test_a_job_without_a_webhook(
    worker: Worker, tally: Tally, make_key: Any, database_url: str
) -> None:
    plain = make_key("lean")
    run_counted(worker, tally, plain)  # connections, scripts and queues warmed up
    counts = run_counted(worker, tally, plain)
    text = report("no webhook", database_url, counts)
    extra = LEAN_SQLITE_EXTRA if database_url.startswith("sqlite") else 0
    assert len(counts.worker.statements) <= LEAN_STATEMENTS + extra, text
    assert counts.worker.begins <= LEAN_TRANSACTIONS, text
    assert counts.worker.pings == 0, text
    trips = len(counts.worker.redis) + len(counts.intake.redis)
    assert trips <= REDIS_ROUND_TRIPS, text


def test_a_job_with_a_webhook(
    worker: Worker, tally: Tally, make_key: Any, database_url: str
) -> None:
    plain = make_key("hooked")
    with session_scope(worker.settings) as session:
        key = authenticate(session, plain)
        assert key is not None
        subscriptions.subscribe(
            session, key, "http://127.0.0.1:9/hook", ["job.succeeded"], allow_private=True
        )
    hook = {"webhook_url": "http://127.0.0.1:9/job"}
    run_counted(worker, tally, plain, **hook)
    counts = run_counted(worker, tally, plain, **hook)
    text = report("webhook", database_url, counts)
    extra = LEAN_SQLITE_EXTRA if database_url.startswith("sqlite") else 0
    assert len(counts.worker.statements) <= WEBHOOK_STATEMENTS + extra, text
    assert counts.worker.begins <= LEAN_TRANSACTIONS, text
    assert counts.worker.pings == 0, text
    _ = Decimal
