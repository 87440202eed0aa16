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

The lean path is a key without a budget or an rpm, granted at once by the limiter, on
PostgreSQL (production):
- without a webhook: at most 4 statements in at most 2 transactions (2 today: the claim,
  which reads the job and its key; the record, one statement of data-modifying CTEs, run
  on a connection in autocommit, so without BEGIN and COMMIT round trips around it);
- with one (the job's webhook_url and a subscription of its key): at most 6 statements (3:
  the claim, which returns the whole row the event's body is built from; the key's
  subscriptions, read before the record, which inserts the deliveries too, still in
  autocommit);
- in Redis, at most 6 round trips in all, intake included, the deliveries' messages aside.
SQLite has no data-modifying CTE: the five writes PostgreSQL folds into one statement (the
attempt's row, the job's end, its hour's usage, the call's hour, the spend) are one
statement each there, four more, in the same two transactions (STATEMENTS).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import pytest
from helpers import record_redis_trips, unique
from sqlalchemy import event, select, update
from standardwebhooks.webhooks import Webhook

from promptq.broker.celery_app import create_celery
from promptq.broker.messenger import BrokerMessenger
from promptq.broker.publish import publish_job
from promptq.clock import utcnow
from promptq.config import Settings
from promptq.db import get_engine, session_scope
from promptq.jobs import service
from promptq.jobs.leases import LeaseKeeper
from promptq.jobs.runner import JobRunner
from promptq.jobspec.presenter import job_to_api
from promptq.jobspec.schemas import JobCreate
from promptq.keys.service import authenticate
from promptq.models import Job, WebhookDelivery
from promptq.pricing import PriceTable
from promptq.ratelimit.limiter import RedisLimiter
from promptq.ratelimit.table import LimitTable
from promptq.redis_roles import client_for
from promptq.simulator import Simulator, SimulatorConfig
from promptq.testing import SONNET
from promptq.upstream import UpstreamClient
from promptq.webhooks import deliveries, subscriptions
from promptq.webhooks.deliveries import PreparedDelivery

# Statements per job, by database and kind of job (see the module's docstring for SQLite's).
STATEMENTS = {
    ("postgresql", "no webhook"): 4,
    ("postgresql", "webhook"): 6,
    ("sqlite", "no webhook"): 6,
    ("sqlite", "webhook"): 9,
}
TRANSACTIONS = 2
# Intake and worker together, the webhook deliveries' own messages aside.
REDIS_ROUND_TRIPS = 6


@dataclass
class Tally:
    statements: list[str] = field(default_factory=list)
    begins: int = 0
    commits: int = 0
    # Statements run on a connection in autocommit: no BEGIN and COMMIT sent around them.
    autocommitted: int = 0
    checkouts: int = 0
    pings: int = 0
    # Each Redis round trip as the commands it carried (a pipeline carries several).
    redis: list[list[str]] = field(default_factory=list)
    # Counted only from this thread, when set: the job's. Threads that earlier tests of the
    # session left running in this process (an API's listener, a lease keeper) use Redis
    # and the same database too, and are no part of the job's cost.
    thread: int | None = None

    def ours(self) -> bool:
        return self.thread is None or threading.get_ident() == self.thread

    def reset(self) -> None:
        self.statements.clear()
        self.redis.clear()
        self.begins = self.commits = self.checkouts = self.pings = self.autocommitted = 0

    def describe(self) -> str:
        shown = "\n  ".join(s.split("\n")[0][:110] for s in self.statements)
        trips = "; ".join(" ".join(trip) for trip in self.redis)
        return (
            f"{len(self.statements)} statements in {self.begins} transactions "
            f"({self.autocommitted} statements in autocommit, {self.commits} commits, "
            f"{self.checkouts} checkouts, {self.pings} pings), "
            f"{len(self.redis)} Redis round trips [{trips}]:\n  {shown}"
        )


@pytest.fixture
def redis_tally(monkeypatch: pytest.MonkeyPatch) -> Tally:
    """Counts the Redis round trips of this process (of Tally.thread, once set), as the
    commands each carried."""
    counted = Tally()
    record_redis_trips(monkeypatch, lambda _: counted.ours(), counted.redis)
    return counted


@pytest.fixture
def tally(
    database_url: str, redis_tally: Tally, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Tally]:
    """redis_tally, and the statements, transactions, checkouts and pings of the database."""
    counted = redis_tally
    counted.thread = threading.get_ident()  # the test's, where the job runs
    engine = get_engine(database_url)

    def on_statement(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if counted.ours():
            counted.statements.append(statement)
            dbapi_connection = conn.connection.dbapi_connection
            counted.autocommitted += getattr(dbapi_connection, "autocommit", False) is True

    def on_begin(_conn: Any) -> None:
        counted.begins += counted.ours()

    def on_commit(_conn: Any) -> None:
        counted.commits += counted.ours()

    def on_checkout(*_: Any) -> None:
        counted.checkouts += counted.ours()

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
        counted.pings += counted.ours()
        return bool(do_ping(dbapi_connection))

    monkeypatch.setattr(engine.dialect, "do_ping", counting_ping)
    yield counted
    for target, name, listener in listeners:
        event.remove(target, name, listener)


@dataclass
class Worker:
    settings: Settings
    runner: JobRunner
    app: Any
    leases: LeaseKeeper


@pytest.fixture(scope="module")
def upstream() -> Iterator[Simulator]:
    """The simulator with limits, so that it sends anthropic-ratelimit-* headers with every
    answer, as Anthropic does (the worker tells its limiter what they say)."""
    config = SimulatorConfig(rpm=10**6, input_tpm=10**9, output_tpm=10**9)
    with Simulator(config) as server:
        yield server


@pytest.fixture
def worker(quiet_env: dict[str, str], database_url: str, upstream: Simulator) -> Iterator[Worker]:
    """The worker's parts, built as worker.context builds them, on a Redis database no
    worker process consumes (so the messages the job's path sends stay where they are)."""
    simulator = upstream
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


def subscribe(worker: Worker, plain: str, url: str) -> tuple[str, str]:
    """Subscribe the key to job.succeeded at `url`; its id and webhook signing secret."""
    with session_scope(worker.settings) as session:
        key = authenticate(session, plain)
        assert key is not None
        subscriptions.subscribe(session, key, url, ["job.succeeded"], allow_private=True)
        return key.id, key.webhook_secret


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
        autocommitted=tally.autocommitted,
        checkouts=tally.checkouts,
        pings=tally.pings,
        redis=list(tally.redis),
    )
    assert outcome == "succeeded", outcome
    with session_scope(worker.settings) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "succeeded" and job.cost_total is not None
        expected = {"pending"} if extra.get("webhook_url") else {None}
        assert job.webhook_status in expected
        # Each event's body is the job as written, to the last digit of its cost (on
        # PostgreSQL it is made before the record that writes it).
        for delivery in session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
        ):
            assert json.loads(delivery.body)["data"] == job_to_api(job)
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
    # Another key's subscription, as a deployment has: it must not make this key's jobs
    # look for theirs (on SQLite an unqualified subquery once did).
    subscribe(worker, make_key("subscribed"), "http://127.0.0.1:9/hook")
    run_counted(worker, tally, plain)  # connections, scripts and queues warmed up
    check(run_counted(worker, tally, plain), "no webhook", database_url, deliveries=0)


def test_a_job_with_a_webhook(
    worker: Worker, tally: Tally, make_key: Any, database_url: str
) -> None:
    plain = make_key("hooked")
    subscribe(worker, plain, "http://127.0.0.1:9/hook")
    hook = {"webhook_url": "http://127.0.0.1:9/job"}
    run_counted(worker, tally, plain, **hook)
    # Two deliveries: the job's webhook_url and the key's subscription.
    check(run_counted(worker, tally, plain, **hook), "webhook", database_url, deliveries=2)


def run_until_called(
    runner: JobRunner, job_id: str, upstream: Simulator
) -> tuple[threading.Thread, list[str]]:
    """Run the job in a thread of its own, returned once its call is at the upstream, with
    the list its outcome will be put in."""
    ended: list[str] = []
    running = threading.Thread(target=lambda: ended.append(runner.run(job_id)))
    running.start()
    deadline = time.monotonic() + 10
    while upstream.stats()["in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert upstream.stats()["in_flight"] == 1, "the call never started"
    return running, ended


def test_a_subscription_made_while_the_call_runs_still_gets_the_jobs_end(
    worker: Worker, upstream: Simulator, make_key: Any
) -> None:
    # Claimed with no subscription of its key, the job's record writes only its own
    # webhook_url's delivery; the subscription its key makes during the call is owed the
    # job's end all the same, written right after it, and the job's own is not sent twice.
    plain = make_key("late")
    job_id = submit(
        worker,
        plain,
        prompt=unique("[[sim:latency=1]] late"),
        webhook_url="http://127.0.0.1:9/own",
    )
    running, ended = run_until_called(worker.runner, job_id, upstream)
    with session_scope(worker.settings) as session:
        key = authenticate(session, plain)
        assert key is not None
        subscriptions.subscribe(
            session, key, "http://127.0.0.1:9/late", ["job.succeeded"], allow_private=True
        )
    running.join(timeout=30)

    assert ended == ["succeeded"]
    with session_scope(worker.settings) as session:
        sent = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
        ).all()
        assert sorted((d.url, d.event_type) for d in sent) == [
            ("http://127.0.0.1:9/late", "job.succeeded"),
            ("http://127.0.0.1:9/own", "job.succeeded"),
        ]


@dataclass
class HandingRoom:
    """An in-memory promptq.webhooks.deliveries.DeliveryRoom with room for `room`
    deliveries (the worker's is its delivery pool)."""

    room: int
    taken: list[str] = field(default_factory=list)
    handed: list[PreparedDelivery] = field(default_factory=list)

    def take_room(self, key_id: str) -> bool:
        if len(self.taken) >= self.room:
            return False
        self.taken.append(key_id)
        return True

    def give_room_back(self, key_id: str) -> None:
        self.taken.remove(key_id)

    def hand_over(self, prepared: PreparedDelivery) -> None:
        self.handed.append(prepared)


def test_a_job_claimed_the_long_way_reads_its_row_for_its_event(
    worker: Worker, make_key: Any, database_url: str
) -> None:
    # A key with an rpm is claimed the long way (read, admitted, then claimed), with no row
    # returned by the claim: the event of its end is made from the job read before the
    # record, and is the job as recorded all the same.
    plain = make_key("long-way", rpm=60_000)
    room = HandingRoom(room=1)
    runner = replace(worker.runner, delivery_room=room)
    job_id = submit(worker, plain, webhook_url="http://127.0.0.1:9/own")
    assert runner.run(job_id) == "succeeded"
    with session_scope(worker.settings) as session:
        job = session.get(Job, job_id)
        assert job is not None
        [delivery] = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
        )
        assert json.loads(delivery.body)["data"] == job_to_api(job)
        secret = authenticate(session, plain).webhook_secret  # type: ignore[union-attr]
    if database_url.startswith("sqlite"):
        assert room.handed == []
        return
    [prepared] = room.handed
    assert prepared.body == delivery.body.encode()
    Webhook(secret).verify(prepared.body, prepared.headers)


def test_a_key_revoked_during_the_call_has_its_jobs_end_written_but_not_sent(
    worker: Worker, tally: Tally, upstream: Simulator, make_key: Any, database_url: str
) -> None:
    # The event's body comes from the claim's row, read before the call; whether the key
    # was revoked since, the record says. Its delivery is written (claimed, on PostgreSQL)
    # but neither handed over nor published, and the sender that takes it once due fails it.
    plain = make_key("revoked-midway")
    room = HandingRoom(room=4)
    runner = replace(worker.runner, delivery_room=room)
    job_id = submit(
        worker,
        plain,
        prompt=unique("[[sim:latency=1]] midway"),
        webhook_url="http://127.0.0.1:9/own",
    )
    running, ended = run_until_called(runner, job_id, upstream)
    tally.reset()
    tally.thread = running.ident  # the job's, from here on
    with session_scope(worker.settings) as session:
        key = authenticate(session, plain)
        assert key is not None
        key.revoked_at = utcnow()
    running.join(timeout=30)

    assert ended == ["succeeded"]
    assert room.handed == [] and room.taken == []
    published = [trip for trip in tally.redis if trip == ["LPUSH"]]
    with session_scope(worker.settings) as session:
        [own] = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id))
        own_id = own.id
        if database_url.startswith("sqlite"):
            # Nothing handed over there: published as any, for its sender to fail.
            assert len(published) == 1
        else:
            # Written claimed: due once the lease runs out, as after a lost sender.
            assert published == []
            assert own.attempts == 1 and own.status == "pending"
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == own_id)
                .values(next_attempt_at=utcnow() - timedelta(seconds=1))
            )
    with session_scope(worker.settings) as session:
        assert deliveries.take(session, own_id) is None
    with session_scope(worker.settings) as session:
        failed = session.get(WebhookDelivery, own_id)
        assert failed is not None and failed.status == "failed"


def test_a_jobs_deliveries_are_handed_to_the_workers_pool_claimed_while_it_has_room(
    worker: Worker, tally: Tally, make_key: Any, database_url: str
) -> None:
    # On PostgreSQL the record writes a delivery the pool has room for claimed for its first
    # attempt, signed, and hands it over rather than publish it for a sender to claim.
    # The rest (here the subscription's: room for one) is published as ever; on SQLite all.
    plain = make_key("handed")
    key_id, secret = subscribe(worker, plain, "http://127.0.0.1:9/sub")
    room = HandingRoom(room=1)
    runner = replace(worker.runner, delivery_room=room)
    job_id = submit(worker, plain, webhook_url="http://127.0.0.1:9/own")
    tally.reset()
    assert runner.run(job_id) == "succeeded"

    published = [trip for trip in tally.redis if trip == ["LPUSH"]]
    with session_scope(worker.settings) as session:
        sent = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id))
        rows = {delivery.url.rsplit("/", 1)[1]: delivery for delivery in sent}
    assert rows["sub"].attempts == 0 and rows["sub"].status == "pending"
    if database_url.startswith("sqlite"):
        assert room.handed == [] and room.taken == [] and len(published) == 2
        return
    [prepared] = room.handed
    own = rows["own"]
    assert (prepared.id, prepared.attempt, prepared.url) == (own.id, 1, own.url)
    assert prepared.body == own.body.encode()
    Webhook(secret).verify(prepared.body, prepared.headers)  # raises if the signature is wrong
    # Claimed as take() claims: the attempt counted, leased, so no sender takes it meanwhile.
    assert own.attempts == 1 and own.next_attempt_at is not None
    assert own.next_attempt_at - own.created_at == deliveries.SENDING_LEASE
    assert room.taken == [key_id] and len(published) == 1

    # A worker stopping with it unsent gives its claim back: due at once, the attempt never
    # made not counted.
    with session_scope(worker.settings) as session:
        deliveries.unclaim(session, [own.id])
    with session_scope(worker.settings) as session:
        back = session.get(WebhookDelivery, own.id)
        assert back is not None and back.attempts == 0
        assert back.next_attempt_at is not None and back.next_attempt_at <= utcnow()

    # Taken again for its first attempt, should that worker die before recording it, the
    # delivery falls due once the lease runs out, and the sweeper's sender takes it as any
    # other: nothing is lost.
    with session_scope(worker.settings) as session:
        first = deliveries.take(session, own.id)
        assert first is not None and first.attempt == 1
    with session_scope(worker.settings) as session:
        lapsed = utcnow() - timedelta(seconds=3)
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == own.id)
            .values(next_attempt_at=lapsed)
        )
    with session_scope(worker.settings) as session:
        assert own.id in deliveries.due(session, utcnow() - timedelta(seconds=2))
        again = deliveries.take(session, own.id)
        assert again is not None and again.attempt == 2
    # The stopping worker that handed it over gives its claim back only while it is its
    # own (a first attempt): this one another sender took since is left alone.
    with session_scope(worker.settings) as session:
        deliveries.unclaim(session, [own.id])
    with session_scope(worker.settings) as session:
        taken = session.get(WebhookDelivery, own.id)
        assert taken is not None and taken.attempts == 2
        assert taken.next_attempt_at is not None and taken.next_attempt_at > utcnow()


def check(counts: JobCounts, kind: str, database_url: str, deliveries: int) -> None:
    text = report(kind, database_url, counts)
    database = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    assert len(counts.worker.statements) <= STATEMENTS[(database, kind)], text
    assert counts.worker.begins <= TRANSACTIONS, text
    # On PostgreSQL the record is one statement, its deliveries in it, run in autocommit
    # with what it reads before it (a webhook's: the subscriptions).
    autocommitted = {"no webhook": 1, "webhook": 2}[kind] if database == "postgresql" else 0
    assert counts.worker.autocommitted == autocommitted, text
    # Connections in constant use are not pinged before each checkout.
    assert counts.worker.pings == 0, text
    # The limiter's settle and its feedback from the answer's headers share a round trip.
    assert ["EVALSHA", "EVALSHA"] in counts.worker.redis, text
    sent = [trip for trip in counts.worker.redis if trip == ["LPUSH"]]
    assert len(sent) == deliveries, text
    trips = len(counts.worker.redis) + len(counts.intake.redis) - deliveries
    assert trips <= REDIS_ROUND_TRIPS, text


TRANSPORT_MESSAGES = 20


def test_celery_transport_round_trips(
    quiet_env: dict[str, str], redis_tally: Tally, database_url: str
) -> None:
    """Celery's own per-message Redis traffic, apart from the job's: a worker (Celery's, in
    this process, threads pool and task events as `promptq worker` runs it) consumes and
    acknowledges messages of a task that does nothing. Reported, per message, by command;
    asserted only to be there (they are the transport's, not promptq's to cut)."""
    from celery.contrib.testing.worker import start_worker

    if not database_url.startswith("sqlite"):
        # No database in it: counted once (and Celery's embedded worker starts once a process).
        pytest.skip("the transport's traffic is the same whatever the database")
    settings = Settings(redis_url=quiet_env["PROMPTQ_REDIS_URL"])
    app = create_celery(settings)
    done: list[int] = []

    @app.task(name="promptq.tests.noop", ignore_result=True, acks_late=True, shared=False)  # type: ignore[misc]
    def noop(number: int) -> None:
        done.append(number)

    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False):
        for number in range(3):  # connections and queues warmed up
            noop.delay(number)
        _wait_for(lambda: len(done) == 3)
        tally = redis_tally
        tally.reset()
        with app.producer_or_acquire() as producer:
            for number in range(TRANSPORT_MESSAGES):
                noop.apply_async((number,), producer=producer)
        _wait_for(lambda: len(done) == 3 + TRANSPORT_MESSAGES)
        # The last acknowledgement lands just after the task returns.
        _wait_for(lambda: sum("ZREM" in trip for trip in tally.redis) >= TRANSPORT_MESSAGES)
        # The worker consumes while the messages are still being sent: the sender's pushes
        # are told apart by their command.
        trips = [trip for trip in tally.redis if trip != ["LPUSH"]]
    by_command: dict[str, int] = {}
    for trip in trips:
        name = "+".join(trip)
        by_command[name] = by_command.get(name, 0) + 1
    per_message = len(trips) / TRANSPORT_MESSAGES
    text = (
        f"Celery transport, per message (of {TRANSPORT_MESSAGES}): {per_message:.2f} Redis "
        f"round trips: "
        + ", ".join(
            f"{name} {count / TRANSPORT_MESSAGES:.2f}" for name, count in sorted(by_command.items())
        )
    )
    print(text)
    assert any("ZREM" in trip for trip in trips), text


def _wait_for(condition: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
