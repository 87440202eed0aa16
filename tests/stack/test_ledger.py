"""The spend ledger (a key's spend per UTC month) and the hourly rollups, kept as the work is
recorded, equal to the sums of the jobs and attempts themselves, to the picodollar, whatever
happened on the way (retries, failures, cancels, batch requests, a budget refusal, a
database outage in the middle of recording). Real worker process, real databases, the
simulator over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis
from helpers import auth, unique, wait_for_status
from money_helpers import key_id_of, summed
from netcut import CuttableProxy
from sqlalchemy import BigInteger, event, func, select, type_coerce
from sqlalchemy.engine import make_url

from promptq import budgets
from promptq.db import get_engine, session_scope
from promptq.jobs import service
from promptq.jobs.leases import LeaseKeeper
from promptq.jobs.runner import JobRunner
from promptq.jobspec.schemas import JobCreate
from promptq.keys.service import authenticate
from promptq.models import LATENCY_BUCKETS_MS, Attempt, AttemptHourly, Job, SpendLedger, UsageHourly
from promptq.periods import month_key
from promptq.pricing import PriceTable
from promptq.ratelimit.limiter import RedisLimiter
from promptq.ratelimit.table import LimitTable
from promptq.rollups import floor_hour
from promptq.rollups.reading import rollup_rows
from promptq.testing import FINAL, SONNET, SentMessages
from promptq.types import picodollars_to_usd
from promptq.upstream import UpstreamClient

PRICES = PriceTable.load(None)


def ledger_of(database_url: str, api_key_id: str) -> dict[str, tuple[Decimal, int]]:
    with session_scope(database_url) as session:
        rows = session.scalars(select(SpendLedger).where(SpendLedger.api_key_id == api_key_id))
        return {row.month: (row.spent, row.jobs) for row in rows}


def recorded_costs(database_url: str, api_key_id: str) -> dict[str, tuple[Decimal, int]]:
    """The same figures summed from the jobs themselves, per UTC month of finished_at."""
    with session_scope(database_url) as session:
        totals: dict[str, tuple[Decimal, int]] = {}
        for finished_at, cost in session.execute(
            select(Job.finished_at, type_coerce(Job.cost_total, BigInteger)).where(
                Job.api_key_id == api_key_id, Job.cost_total.is_not(None)
            )
        ):
            month = month_key(finished_at)
            spent, jobs = totals.get(month, (Decimal(0), 0))
            totals[month] = (spent + picodollars_to_usd(int(cost)), jobs + 1)
        return totals


def usage_rollups(database_url: str, api_key_id: str) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """The key's usage rollup, its shards added up: (hour, model, status, priced) -> (jobs,
    tokens, costs)."""
    with session_scope(database_url) as session:
        usage = rollup_rows(UsageHourly)
        rows = session.execute(select(usage).where(usage.c.api_key_id == api_key_id))
        return summed(
            (
                (row.hour, row.model, row.status, row.priced),
                (
                    row.jobs,
                    row.input_tokens,
                    row.output_tokens,
                    row.cache_creation_input_tokens,
                    row.cache_read_input_tokens,
                    *(
                        _pico(value)
                        for value in (
                            row.cost_total,
                            row.cost_input,
                            row.cost_output,
                            row.cost_cache_write,
                            row.cost_cache_read,
                        )
                    ),
                ),
            )
            for row in rows
        )


def usage_from_jobs(database_url: str, api_key_id: str) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """The same, summed from the key's ended jobs."""
    totals: dict[tuple[Any, ...], list[int]] = {}
    with session_scope(database_url) as session:
        for job in session.scalars(select(Job).where(Job.api_key_id == api_key_id)):
            if job.status not in FINAL or job.finished_at is None:
                continue
            key = (floor_hour(job.finished_at), job.model, job.status, job.cost_total is not None)
            row = totals.setdefault(key, [0] * 10)
            values = (
                1,
                job.input_tokens or 0,
                job.output_tokens or 0,
                job.cache_creation_input_tokens or 0,
                job.cache_read_input_tokens or 0,
                *(
                    _pico(value or Decimal(0))
                    for value in (
                        job.cost_total,
                        job.cost_input,
                        job.cost_output,
                        job.cost_cache_write,
                        job.cost_cache_read,
                    )
                ),
            )
            totals[key] = [a + b for a, b in zip(row, values, strict=True)]
    return {key: tuple(value) for key, value in totals.items()}


def attempt_rollups(database_url: str, api_key_id: str) -> dict[tuple[Any, ...], tuple[int, ...]]:
    with session_scope(database_url) as session:
        calls = rollup_rows(AttemptHourly)
        rows = session.execute(select(calls).where(calls.c.api_key_id == api_key_id))
        return summed(
            (
                (row.hour, row.model, row.outcome, row.status_code),
                (
                    row.attempts,
                    row.latency_ms_sum,
                    *(getattr(row, f"le_{i}") for i in range(len(LATENCY_BUCKETS_MS))),
                ),
            )
            for row in rows
        )


def attempts_from_rows(
    database_url: str, api_key_id: str
) -> dict[tuple[Any, ...], tuple[int, ...]]:
    totals: dict[tuple[Any, ...], list[int]] = {}
    with session_scope(database_url) as session:
        query = (
            select(Attempt, Job.model)
            .join(Job, Job.id == Attempt.job_id)
            .where(Job.api_key_id == api_key_id)
        )
        for attempt, model in session.execute(query):
            code = str(attempt.status_code) if attempt.status_code is not None else "none"
            key = (floor_hour(attempt.finished_at), model, attempt.outcome, code)
            row = totals.setdefault(key, [0] * (2 + len(LATENCY_BUCKETS_MS)))
            values = (
                1,
                attempt.latency_ms,
                *(int(attempt.latency_ms <= bound) for bound in LATENCY_BUCKETS_MS),
            )
            totals[key] = [a + b for a, b in zip(row, values, strict=True)]
    return {key: tuple(value) for key, value in totals.items()}


def _pico(value: Decimal) -> int:
    return int(value * 10**12)


def queued_job(database_url: str, settings: Any, plain: str, prompt: str, **extra: Any) -> str:
    """A job stored through the service but never published: no worker runs it."""
    with session_scope(database_url) as session:
        key = authenticate(session, plain)
        assert key is not None
        body = {"prompt": prompt, "model": SONNET, "max_tokens": 16, **extra}
        return service.create_job(session, settings, key, JobCreate.model_validate(body)).job.id


def test_the_ledger_equals_the_recorded_costs_after_a_mixed_run(
    client: Any, worker_process: Any, database_url: str, settings: Any, make_key: Any
) -> None:
    plain = make_key("ledger", monthly_budget_usd=Decimal(100))
    key = key_id_of(database_url, plain)
    prompts = [
        unique("plain success"),
        unique("another success, longer answer please"),
        unique("[[sim:529 x1]] retried, then fine"),
        unique("[[sim:400]] refused upstream"),
        unique("[[sim:500]] never recovers"),
    ]
    submitted = [
        client.post("/v1/jobs", json={"prompt": p, "model": SONNET}, headers=auth(plain))
        for p in prompts
    ]
    assert [r.status_code for r in submitted] == [202] * len(prompts)
    # A cancel: never run, never charged.
    canceled = queued_job(database_url, settings, plain, unique("canceled before it ran"))
    assert client.post(f"/v1/jobs/{canceled}/cancel", headers=auth(plain)).status_code == 200
    # A batch: two requests that run, one invalid from the start.
    batch = client.post(
        "/v1/messages/batches",
        json={
            "requests": [
                {
                    "custom_id": f"r{i}",
                    "params": {
                        "model": SONNET,
                        "max_tokens": 0 if i == 2 else 16,
                        "messages": [{"role": "user", "content": unique(f"batch {i}")}],
                    },
                }
                for i in range(3)
            ]
        },
        headers=auth(plain),
    )
    assert batch.status_code == 200, batch.text
    # A budget refusal: a key whose budget cannot hold the job's most possible cost is
    # refused at intake, and the refused job costs nothing.
    poor = make_key("ledger poor", monthly_budget_usd=Decimal("0.001"))
    refused = client.post(
        "/v1/jobs",
        json={"prompt": unique("too dear"), "model": SONNET, "max_tokens": 4000},
        headers=auth(poor),
    )
    assert refused.status_code == 402, refused.text
    assert refused.json()["error"]["type"] == "budget_exceeded_error"

    jobs = [wait_for_status(client, plain, r.json()["id"], FINAL, timeout=40) for r in submitted]
    assert [job["status"] for job in jobs] == [
        "succeeded",
        "succeeded",
        "succeeded",
        "failed",
        "failed",
    ]
    assert jobs[2]["attempts"] == 2 and jobs[4]["attempts"] == 4
    batch_id = batch.json()["id"]
    for _ in range(400):
        state = client.get(f"/v1/messages/batches/{batch_id}", headers=auth(plain)).json()
        if state["processing_status"] == "ended":
            break
        threading.Event().wait(0.05)
    assert state["request_counts"]["succeeded"] == 2 and state["request_counts"]["errored"] == 1

    month = month_key(_parse(jobs[0]["finished_at"]))
    ledger = ledger_of(database_url, key)
    assert ledger == recorded_costs(database_url, key)
    # Three jobs and two batch requests were charged; the answer's own costs add up to it.
    charged = sum((Decimal(j["cost"]["total"]) for j in jobs if j["cost"]), Decimal(0))
    assert ledger[month][1] == 5
    assert ledger[month][0] > charged > 0
    # The refused key was charged nothing, and its budget check reads the ledger.
    assert ledger_of(database_url, key_id_of(database_url, poor)) == {}
    with session_scope(database_url) as session:
        assert budgets.budget_state(session, key, Decimal(100)).spent == ledger[month][0]

    # The rollups hold every ended job and every call exactly once, as the rows do.
    poor_id = key_id_of(database_url, poor)
    for key_id in (key, poor_id):
        assert usage_rollups(database_url, key_id) == usage_from_jobs(database_url, key_id)
        assert attempt_rollups(database_url, key_id) == attempts_from_rows(database_url, key_id)
    statuses = {status for (_, _, status, _) in usage_rollups(database_url, key)}
    assert statuses == {"succeeded", "failed", "canceled"}
    # And the usage report, read from them, is the jobs' own sums.
    report = client.get("/v1/usage", headers=auth(plain)).json()
    assert report["total"]["jobs"] == 5
    assert Decimal(report["total"]["cost"]["total"]) == ledger[month][0]


def _parse(text: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture
def database_proxy(database_url: str) -> Iterator[CuttableProxy]:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite is a file: there is no server to lose")
    parsed = make_url(database_url)
    proxy = CuttableProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
    yield proxy
    proxy.stop()


def test_a_database_outage_while_recording_neither_loses_nor_doubles_the_cost(
    database_url: str,
    database_proxy: CuttableProxy,
    settings: Any,
    simulator: Any,
    make_key: Any,
) -> None:
    """The link to PostgreSQL is cut right after the ledger's increment, before the commit:
    the recording transaction is lost whole, the worker's patience records it again once
    the database is back, and the ledger holds the cost once."""
    plain = make_key("ledger outage", monthly_budget_usd=Decimal(100))
    key = key_id_of(database_url, plain)
    prompt = unique("recorded through an outage")
    job_id = queued_job(database_url, settings, plain, prompt)
    proxied = (
        make_url(database_url)
        .set(host="127.0.0.1", port=database_proxy.port)
        .render_as_string(hide_password=False)
    )
    own = settings.model_copy(update={"database_url": proxied})
    limiter = RedisLimiter(
        redis.Redis.from_url(settings.redis_url), LimitTable.load(settings.limits_file)
    )
    leases = LeaseKeeper(own, limiter)
    runner = JobRunner(
        own,
        PRICES,
        UpstreamClient(settings.upstream_url, settings.upstream_key, timeout=10),
        limiter,
        leases,
        SentMessages(),
    )
    cuts: list[str] = []

    def cut_after_the_increment(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        # Its own INSERT, or (PostgreSQL, promptq.jobs.recording) a part of the one statement
        # that records the attempt.
        increment = "INSERT INTO spend_ledger" in statement
        if increment and not cuts:
            cuts.append(statement)
            database_proxy.cut()
            threading.Timer(1.5, database_proxy.restore).start()

    engine = get_engine(proxied)
    event.listen(engine, "after_cursor_execute", cut_after_the_increment)
    try:
        outcome = runner.run(job_id)
    finally:
        event.remove(engine, "after_cursor_execute", cut_after_the_increment)
        leases.stop()
        engine.dispose()
    assert cuts, "the recording never reached the ledger"
    assert outcome == "succeeded"
    with session_scope(database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.cost_total is not None and job.finished_at is not None
        assert job.attempts == 1
        cost, month = job.cost_total, month_key(job.finished_at)
        total = session.scalar(
            select(func.count()).select_from(SpendLedger).where(SpendLedger.api_key_id == key)
        )
    assert total == 1
    assert ledger_of(database_url, key) == {month: (cost, 1)} == recorded_costs(database_url, key)
    assert usage_rollups(database_url, key) == usage_from_jobs(database_url, key)
    assert attempt_rollups(database_url, key) == attempts_from_rows(database_url, key)
    assert sum(row[0] for row in attempt_rollups(database_url, key).values()) == 1
    # Recorded again from the answer kept in memory, not asked for twice.
    assert simulator.stats()["calls_by_prompt"][prompt[:60]] == 1
