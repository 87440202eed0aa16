"""Monthly budgets: 402 at intake once spent, and a reservation of each job's maximum cost
when it starts, so that jobs starting at once cannot together overshoot the budget. Real
worker process, real database (SQLite, and PostgreSQL when configured), the simulator."""

from __future__ import annotations

import re
import subprocess
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from typing import Any

import requests
from helpers import auth, clean_env, run_promptq, unique, wait_for_status
from money_helpers import add_job, key_id_of
from sqlalchemy import event, select

from promptq import budgets
from promptq.budgets.repository import BudgetRepository
from promptq.clock import utcnow
from promptq.db import get_engine, session_scope
from promptq.jobs import service
from promptq.jobs.execution import Refusal, claim_job, reserve_budget, runnable_job
from promptq.jobs.sweeping import reclaim_expired
from promptq.jobspec.schemas import JobCreate
from promptq.keys.service import authenticate
from promptq.models import ApiKey, BudgetReservation, Job
from promptq.periods import month_start, next_month_start
from promptq.pricing import PriceTable, format_usd
from promptq.testing import FINAL, SONNET

PRICES = PriceTable.load(None)
PICO = Decimal("1e-12")


def upstream_calls(simulator: Any, prompt: str) -> int:
    """What the simulator saw, through its HTTP stats endpoint."""
    stats = requests.get(f"{simulator.url}/_sim/stats", timeout=5).json()
    return int(stats["calls_by_prompt"].get(prompt[:60], 0))


def upstream_request(settings: Any, prompt: str, max_tokens: int = 16) -> dict[str, Any]:
    """The request a flat job with this prompt sends upstream."""
    payload = JobCreate.model_validate(
        {"prompt": prompt, "model": SONNET, "max_tokens": max_tokens}
    )
    return payload.messages_request(
        settings.default_model, settings.default_max_tokens
    ).to_upstream()


def reservations(database_url: str, api_key_id: str) -> dict[str, Decimal]:
    with session_scope(database_url) as session:
        return {
            row.job_id: row.amount for row in BudgetRepository(session).reservations(api_key_id)
        }


def committed(database_url: str, api_key_id: str) -> budgets.BudgetState:
    with session_scope(database_url) as session:
        return budgets.budget_state(session, api_key_id, Decimal(1))


def reset_text() -> str:
    return next_month_start(utcnow()).isoformat().replace("+00:00", "Z")


def promptq_cli(
    *args: str, database_url: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run_promptq(*args, env=clean_env(PROMPTQ_DATABASE_URL=database_url), check=check)


# --- keys ------------------------------------------------------------------------------------


def test_keys_create_stores_a_monthly_budget_and_list_shows_it(database_url: str) -> None:
    import json

    created = json.loads(
        promptq_cli(
            "keys",
            "create",
            "budgeted",
            "--monthly-budget",
            "100",
            "--json",
            database_url=database_url,
        ).stdout
    )
    listed = json.loads(promptq_cli("keys", "list", "--json", database_url=database_url).stdout)
    row = next(r for r in listed if r["id"] == created["id"])
    assert row["monthly_budget_usd"] == "100"  # not 1E+2
    table = promptq_cli("keys", "list", database_url=database_url).stdout
    assert any(created["id"] in line and " 100 " in line for line in table.splitlines())
    for bad, words in [
        ("0", "more than 0"),
        ("-5", "more than 0"),
        ("NaN", "more than 0"),
        ("0.0000000000001", "decimal places"),
        ("lots", "US dollars"),
    ]:
        refused = promptq_cli(
            "keys", "create", "x", "--monthly-budget", bad, database_url=database_url, check=False
        )
        assert refused.returncode != 0 and words in refused.stderr, (bad, refused.stderr)


# --- intake ----------------------------------------------------------------------------------


def test_a_spent_budget_refuses_new_jobs_with_402(
    client: Any, worker_process: Any, database_url: str, make_key: Any
) -> None:
    plain = make_key("spent", monthly_budget_usd=Decimal("0.01"))
    key = key_id_of(database_url, plain)
    # Created while under budget; a retry of it later must still get it, not a 402.
    # Small jobs: a job that could cost more than the budget has left is refused at intake.
    body = {"prompt": unique("[[sim:400]] early job"), "idempotency_key": "early", "max_tokens": 16}
    early = client.post("/v1/jobs", json=body, headers=auth(plain))
    assert early.status_code == 202, early.text
    wait_for_status(client, plain, early.json()["id"], FINAL)

    # Spent this month: 0.0121 of 0.01.
    add_job(database_url, key, utcnow(), cost=("0.004", "0.0081", "0", "0"))
    response = client.post("/v1/jobs", json={"prompt": unique("too late")}, headers=auth(plain))
    assert response.status_code == 402, response.text
    error = response.json()["error"]
    assert error["type"] == "budget_exceeded_error"
    message = error["message"]
    assert "monthly budget of 0.01 USD" in message
    assert "0.0121 USD spent this month" in message
    assert f"resets at {reset_text()}" in message
    assert "'spent'" in message  # the key's name

    # A retried request of a job created in time still gets that job.
    again = client.post("/v1/jobs", json=body, headers=auth(plain))
    assert again.status_code == 200 and again.json()["id"] == early.json()["id"]

    # Template jobs go through the same check.
    template = {"name": "budgeted", "prompt": "Summarize {{ text }}"}
    assert client.post("/v1/templates", json=template, headers=auth(plain)).status_code == 201
    from_template = client.post(
        "/v1/templates/budgeted/jobs", json={"text": "x"}, headers=auth(plain)
    )
    assert from_template.status_code == 402
    assert from_template.json()["error"]["type"] == "budget_exceeded_error"


def test_only_this_months_spend_counts(
    client: Any, worker_process: Any, database_url: str, make_key: Any
) -> None:
    plain = make_key("last month", monthly_budget_usd=Decimal("0.01"))
    key = key_id_of(database_url, plain)
    last_month = month_start(utcnow()) - timedelta(microseconds=1)
    add_job(database_url, key, last_month, cost=("5", "5", "0", "0"))
    small = {"prompt": unique("new month"), "max_tokens": 16}
    response = client.post("/v1/jobs", json=small, headers=auth(plain))
    assert response.status_code == 202, response.text
    wait_for_status(client, plain, response.json()["id"], FINAL)


def test_reservations_of_running_jobs_count_at_intake(
    client: Any, database_url: str, make_key: Any
) -> None:
    plain = make_key("reserved", monthly_budget_usd=Decimal("0.01"))
    key = key_id_of(database_url, plain)
    running = add_job(database_url, key, None, status="running")
    ended = add_job(database_url, key, utcnow(), status="failed")
    with session_scope(database_url) as session:
        BudgetRepository(session).reserve(running, key, Decimal("0.006"))
        # A reservation left behind by a job that has ended is never counted.
        BudgetRepository(session).reserve(ended, key, Decimal("1"))
    assert committed(database_url, key).reserved == Decimal("0.006")
    small = {"prompt": "x", "max_tokens": 16}
    assert client.post("/v1/jobs", json=small, headers=auth(plain)).status_code == 202
    with session_scope(database_url) as session:
        BudgetRepository(session).reserve(running, key, Decimal("0.01"))
    response = client.post("/v1/jobs", json=small, headers=auth(plain))
    assert response.status_code == 402
    # At least the 0.01 USD reserved here: the job accepted above may hold its own by now.
    message = response.json()["error"]["message"]
    reserved = re.search(r"([0-9.]+) USD reserved for jobs in flight", message)
    assert reserved is not None and Decimal(reserved.group(1)) >= Decimal("0.01"), message
    with session_scope(database_url) as session:
        session.get(Job, running).status = "failed"  # type: ignore[union-attr]
        budgets.release(session, [running, ended])


def test_keys_without_a_budget_cost_no_query(database_url: str, make_key: Any) -> None:
    """Intake runs hundreds of times a second: a key without a budget must not pay for the
    feature, and one with a budget pays one query."""
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    with_budget = key_id_of(database_url, make_key("one query", monthly_budget_usd=Decimal(5)))
    engine = get_engine(database_url)
    with session_scope(database_url) as session:
        key = session.get(ApiKey, with_budget)
        assert key is not None
        session.expunge(key)
        event.listen(engine, "before_cursor_execute", count)
        try:
            budgets.check_budget(session, ApiKey(id="key_x", name="free", monthly_budget_usd=None))
            assert statements == []
            budgets.check_budget(session, key)
            assert len(statements) == 1
        finally:
            event.remove(engine, "before_cursor_execute", count)


# --- reservations ----------------------------------------------------------------------------


def test_the_maximum_cost_is_the_estimate_at_the_prices_charged(settings: Any) -> None:
    from promptq.ratelimit.estimate import estimate_input_tokens

    request = upstream_request(settings, "How much could this cost?", max_tokens=1000)
    tokens = estimate_input_tokens(request)
    # Sonnet 4.5: 3 USD per million input tokens, 15 per million output tokens.
    assert (
        budgets.max_cost(request, SONNET, PRICES)
        == (Decimal(tokens) * 3 + Decimal(1000) * 15) / 1_000_000
    )
    # A request that asks for caching may pay the dearest input-side price: 1-hour writes.
    cached = {
        **request,
        "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
    }
    tokens = estimate_input_tokens(cached)
    assert (
        budgets.max_cost(cached, SONNET, PRICES)
        == (Decimal(tokens) * 6 + Decimal(1000) * 15) / 1_000_000
    )
    # No price, no recorded cost: nothing to hold.
    assert budgets.max_cost(request, "claude-unpriced-model", PRICES) == 0


def _start(settings: Any, database_url: str) -> Callable[[Any], Refusal | None]:
    """What a worker does to start a job, up to the upstream call: claim, then reserve."""

    def start(job: Any) -> Refusal | None:
        with session_scope(database_url) as session:
            claimed = claim_job(session, settings, job)
            assert claimed is not None
            return reserve_budget(session, settings, PRICES, claimed)

    return start


def _queued_jobs(database_url: str, settings: Any, plain: str, prompts: list[str]) -> list[Any]:
    """Jobs created through the service but not published, so no worker runs them."""
    with session_scope(database_url) as session:
        key = authenticate(session, plain)
        assert key is not None
        ids = [
            service.create_job(
                session,
                settings,
                key,
                JobCreate.model_validate({"prompt": p, "model": SONNET, "max_tokens": 16}),
            ).job.id
            for p in prompts
        ]
    with session_scope(database_url) as session:
        return [runnable_job(session, job_id) for job_id in ids]


def test_reservations_are_decided_one_at_a_time(
    database_url: str, settings: Any, make_key: Any
) -> None:
    """Eight jobs of one key start at the same instant in eight threads with their own
    connections; the budget holds three reservations, and exactly three get one."""
    prompts = [unique(f"concurrent start {i}") for i in range(8)]
    cost = budgets.max_cost(upstream_request(settings, prompts[0]), SONNET, PRICES)
    assert all(
        budgets.max_cost(upstream_request(settings, p), SONNET, PRICES) == cost for p in prompts
    )
    plain = make_key("concurrent", monthly_budget_usd=(cost * 3 + cost / 2).quantize(PICO))
    key = key_id_of(database_url, plain)
    jobs = _queued_jobs(database_url, settings, plain, prompts)
    barrier = threading.Barrier(len(jobs))
    start = _start(settings, database_url)

    def at_once(job: Any) -> Refusal | None:
        barrier.wait()
        return start(job)

    with ThreadPoolExecutor(len(jobs)) as pool:
        outcomes = list(pool.map(at_once, jobs))
    started = [job.id for job, refusal in zip(jobs, outcomes, strict=True) if refusal is None]
    assert len(started) == 3
    assert reservations(database_url, key) == {job_id: cost for job_id in started}
    assert committed(database_url, key).reserved == cost * 3
    with session_scope(database_url) as session:
        for job, refusal in zip(jobs, outcomes, strict=True):
            row = session.get(Job, job.id)
            assert row is not None
            if refusal is None:
                assert row.status == "running"
                row.status = "failed"  # so that no sweeper takes it back later
                continue
            assert row.status == "failed" and row.error_type == "budget_exceeded_error"
            assert row.attempts == 0  # the upstream was never asked
            assert row.error_message == refusal.message
            assert f"could cost up to {format_usd(cost)} USD" in refusal.message
        budgets.release(session, started)


def test_jobs_starting_together_cannot_overshoot_the_budget(
    client: Any,
    worker_process: Any,
    database_url: str,
    settings: Any,
    simulator: Any,
    make_key: Any,
) -> None:
    """Five jobs submitted at once against a budget that holds two reservations: at most two
    reach the upstream; the others fail with budget_exceeded_error, never called."""
    tag = uuid.uuid4().hex[:8]
    prompts = [f"{tag} overshoot race {i} [[sim:latency=3]]" for i in range(5)]
    cost = budgets.max_cost(upstream_request(settings, prompts[0]), SONNET, PRICES)
    budget = (cost * 2 + cost / 2).quantize(PICO)
    plain = make_key("race", monthly_budget_usd=budget)
    key = key_id_of(database_url, plain)

    def submit(prompt: str) -> Any:
        return client.post(
            "/v1/jobs",
            json={"prompt": prompt, "model": SONNET, "max_tokens": 16},
            headers=auth(plain),
        )

    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(submit, prompts))
    # A submission that arrives once two jobs already hold their reservations is refused at
    # intake (402) rather than accepted and failed: either way it never reaches the upstream.
    assert {r.status_code for r in responses} <= {202, 402}, [r.text for r in responses]
    at_intake = [r for r in responses if r.status_code == 402]
    for response in at_intake:
        assert response.json()["error"]["type"] == "budget_exceeded_error"
    accepted = [(r, p) for r, p in zip(responses, prompts, strict=True) if r.status_code == 202]
    assert len(accepted) >= 2
    jobs = [wait_for_status(client, plain, r.json()["id"], FINAL, timeout=30) for r, _ in accepted]

    succeeded = [job for job in jobs if job["status"] == "succeeded"]
    refused = [job for job in jobs if job["status"] != "succeeded"]
    assert 1 <= len(succeeded) <= 2
    calls = {
        job["id"]: upstream_calls(simulator, prompt)
        for job, (_, prompt) in zip(jobs, accepted, strict=True)
    }
    assert all(
        upstream_calls(simulator, prompt) == 0
        for response, prompt in zip(responses, prompts, strict=True)
        if response.status_code == 402
    )
    assert sum(calls.values()) == len(succeeded) <= 2
    for job in refused:
        assert job["status"] == "failed"
        assert job["error"]["type"] == "budget_exceeded_error"
        assert calls[job["id"]] == 0 and job["attempts"] == 0
        assert "not started: this job could cost up to" in job["error"]["message"]
        assert f"resets at {reset_text()}" in job["error"]["message"]
    assert reservations(database_url, key) == {}
    spent = sum((Decimal(job["cost"]["total"]) for job in succeeded), Decimal(0))
    assert spent <= budget
    assert committed(database_url, key).spent == spent


def test_a_reservation_is_held_while_running_and_released_when_recorded(
    client: Any, worker_process: Any, database_url: str, settings: Any, make_key: Any
) -> None:
    plain = make_key("lifecycle", monthly_budget_usd=Decimal(100))
    key = key_id_of(database_url, plain)

    slow = unique("held while running [[sim:latency=2]]")
    job_id = client.post(
        "/v1/jobs", json={"prompt": slow, "model": SONNET}, headers=auth(plain)
    ).json()["id"]
    running = wait_for_status(client, plain, job_id, {"running", *FINAL})
    assert running["status"] == "running"
    held = reservations(database_url, key)
    assert held == {job_id: budgets.max_cost(running["request"], SONNET, PRICES)}
    succeeded = wait_for_status(client, plain, job_id, FINAL)
    assert succeeded["status"] == "succeeded"
    assert reservations(database_url, key) == {}
    state = committed(database_url, key)
    assert state.spent == Decimal(succeeded["cost"]["total"]) and state.reserved == 0

    # A permanent failure, and a success after a retried transient one.
    failed = client.post(
        "/v1/jobs", json={"prompt": unique("[[sim:400]] refused upstream")}, headers=auth(plain)
    )
    retried = client.post(
        "/v1/jobs", json={"prompt": unique("[[sim:529 x1]] then fine")}, headers=auth(plain)
    )
    assert wait_for_status(client, plain, failed.json()["id"], FINAL)["status"] == "failed"
    second = wait_for_status(client, plain, retried.json()["id"], FINAL)
    assert second["status"] == "succeeded" and second["attempts"] == 2
    assert reservations(database_url, key) == {}


def test_the_sweeper_releases_a_dead_workers_reservation(
    database_url: str, settings: Any, make_key: Any
) -> None:
    plain = make_key("dead worker", monthly_budget_usd=Decimal(100))
    key = key_id_of(database_url, plain)
    [job] = _queued_jobs(database_url, settings, plain, [unique("claimed by a worker that dies")])
    assert _start(settings, database_url)(job) is None
    assert list(reservations(database_url, key)) == [job.id]
    assert committed(database_url, key).reserved > 0
    # The worker dies: its lease runs out, and the sweeper takes the job back.
    with session_scope(database_url) as session:
        row = session.get(Job, job.id)
        assert row is not None
        row.lease_expires_at = utcnow() - timedelta(seconds=1)
    with session_scope(database_url) as session:
        reclaim_expired(session, settings)
    with session_scope(database_url) as session:
        assert session.get(Job, job.id).status == "retrying"  # type: ignore[union-attr]
        assert (
            session.scalars(
                select(BudgetReservation).where(BudgetReservation.job_id == job.id)
            ).all()
            == []
        )
        # Leave nothing runnable behind for other tests' sweeps.
        session.get(Job, job.id).status = "canceled"  # type: ignore[union-attr]
    assert committed(database_url, key).reserved == 0
