"""GET /v1/usage and `promptq usage`: sums per model, key and UTC day over the jobs with a
recorded cost, exact to the picodollar, on SQLite and PostgreSQL.

Each test writes its jobs into a month of 2020 of its own, so that the admin's view (every
key) sees only that test's jobs however many other tests share the database."""

from __future__ import annotations

import csv
import io
import itertools
import json
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from helpers import auth, clean_env, run_promptq, wait_for_status
from money_helpers import add_job, key_id_of
from pydantic import SecretStr

from promptq.clock import utcnow
from promptq.db import session_scope
from promptq.models import Job
from promptq.periods import month_start, next_month_start
from promptq.testing import HAIKU, SONNET

ADMIN_TOKEN = "pq-admin-" + uuid.uuid4().hex


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def admin_client(settings: Any) -> Iterator[Any]:
    """The API with an admin token configured."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    configured = settings.model_copy(update={"admin_token": SecretStr(ADMIN_TOKEN)})
    with TestClient(create_app(configured)) as test_client:
        yield test_client


def usage(client: Any, token: str, **params: str) -> dict[str, Any]:
    response = client.get("/v1/usage", params=params, headers=auth(token))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def total_of(rows: list[dict[str, Any]]) -> Decimal:
    return sum((Decimal(row["cost"]["total"]) for row in rows), Decimal(0))


def recorded_total(database_url: str, job_ids: list[str]) -> Decimal:
    with session_scope(database_url) as session:
        costs = [session.get(Job, job_id).cost_total for job_id in job_ids]  # type: ignore[union-attr]
    return sum((cost for cost in costs if cost is not None), Decimal(0))


# Every use of the `january` fixture gets a January of its own.
_years = itertools.count(2001)


@pytest.fixture
def january(database_url: str, make_key: Any) -> dict[str, Any]:
    """Two keys, two models, three days of a January, costs down to the picodollar, and
    jobs that must not count: a failure without cost, and jobs just outside the month."""
    year = next(_years)

    def at(text: str) -> datetime:
        return datetime.fromisoformat(text.replace("2020", str(year))).replace(tzinfo=UTC)

    alice, bob = make_key("alice"), make_key("bob")
    a, b = key_id_of(database_url, alice), key_id_of(database_url, bob)
    jobs = [
        add_job(
            database_url,
            a,
            at("2020-01-01T00:00:00"),
            tokens=(100, 20, 5, 7),
            cost=("0.0003", "0.0003", "0.00001875", "0.0000021"),
        ),
        add_job(
            database_url,
            a,
            at("2020-01-01T23:59:59.999999"),
            model=HAIKU,
            tokens=(11, 13, 0, 0),
            cost=("0.000011", "0.000065", "0", "0"),
        ),
        add_job(
            database_url,
            b,
            at("2020-01-02T00:00:00"),
            tokens=(1, 1, 1, 1),
            cost=("0.000000000001", "0.000000000003", "0.000000000007", "0.000000000011"),
        ),
        add_job(
            database_url,
            b,
            at("2020-01-31T12:00:00"),
            model=HAIKU,
            tokens=(123456, 654321, 0, 99),
            cost=("0.123456", "3.271605", "0", "0.0000099"),
        ),
    ]
    # Not counted: no recorded cost; finished the moment February began; before January.
    add_job(database_url, a, at("2020-01-15T00:00:00"), status="failed", tokens=(0, 0, 0, 0))
    add_job(database_url, a, at("2020-02-01T00:00:00"), cost=("1", "1", "0", "0"))
    add_job(
        database_url,
        b,
        at("2020-01-01T00:00:00") - timedelta(microseconds=1),
        cost=("1", "1", "0", "0"),
    )
    return {
        "alice": alice,
        "bob": bob,
        "a": a,
        "b": b,
        "jobs": jobs,
        "year": year,
        "range": {"from": f"{year}-01-01", "to": f"{year}-02-01"},
    }


def test_usage_by_model_sums_tokens_and_cost_exactly(
    admin_client: Any, database_url: str, january: dict[str, Any]
) -> None:
    report = usage(admin_client, ADMIN_TOKEN, group_by="model", **january["range"])
    assert report["group_by"] == "model"
    year = january["year"]
    assert report["from"] == f"{year}-01-01T00:00:00Z" and report["to"] == f"{year}-02-01T00:00:00Z"
    rows = {row["model"]: row for row in report["data"]}
    assert set(rows) == {SONNET, HAIKU}
    assert rows[SONNET]["jobs"] == 2
    assert rows[SONNET]["usage"] == {
        "input_tokens": 101,
        "output_tokens": 21,
        "cache_creation_input_tokens": 6,
        "cache_read_input_tokens": 8,
    }
    assert rows[SONNET]["cost"] == {
        "currency": "USD",
        "total": "0.000620850022",
        "input": "0.000300000001",
        "output": "0.000300000003",
        "cache_write": "0.000018750007",
        "cache_read": "0.000002100011",
    }
    assert rows[HAIKU]["jobs"] == 2
    assert rows[HAIKU]["cost"]["total"] == "3.3951469"
    assert rows[HAIKU]["usage"]["output_tokens"] == 654334
    # The rows add up to the jobs' recorded costs exactly, as Decimal, and to the total.
    assert total_of(report["data"]) == recorded_total(database_url, january["jobs"])
    assert Decimal(report["total"]["cost"]["total"]) == total_of(report["data"])
    assert report["total"]["jobs"] == 4


def test_usage_by_key_names_the_key(admin_client: Any, january: dict[str, Any]) -> None:
    report = usage(admin_client, ADMIN_TOKEN, group_by="key", **january["range"])
    rows = report["data"]
    assert [row["key"] for row in rows] == [
        {"id": january["a"], "name": "alice"},
        {"id": january["b"], "name": "bob"},
    ]
    assert [row["jobs"] for row in rows] == [2, 2]
    assert rows[0]["cost"]["total"] == "0.00069685"
    assert rows[1]["cost"]["total"] == "3.395070900022"


def test_usage_by_day_uses_utc_days(admin_client: Any, january: dict[str, Any]) -> None:
    report = usage(admin_client, ADMIN_TOKEN, group_by="day", **january["range"])
    days = {row["day"].replace(str(january["year"]), "Y"): row for row in report["data"]}
    assert list(days) == ["Y-01-01", "Y-01-02", "Y-01-31"]
    assert days["Y-01-01"]["jobs"] == 2  # midnight and the last microsecond of the day
    assert days["Y-01-02"]["cost"]["total"] == "0.000000000022"
    assert days["Y-01-31"]["cost"]["output"] == "3.271605"


def test_the_range_is_from_inclusive_to_exclusive(
    admin_client: Any, database_url: str, make_key: Any
) -> None:
    key = key_id_of(database_url, make_key("range"))
    first = add_job(database_url, key, at("2020-03-10T00:00:00"), cost=("0.1", "0", "0", "0"))
    add_job(database_url, key, at("2020-03-11T00:00:00"), cost=("0.2", "0", "0", "0"))
    report = usage(admin_client, ADMIN_TOKEN, **{"from": "2020-03-10", "to": "2020-03-11"})
    assert [row["jobs"] for row in report["data"]] == [1]
    assert total_of(report["data"]) == recorded_total(database_url, [first])
    # ISO datetimes with an offset mean the same instants: 01:00+01:00 is midnight UTC.
    report = usage(
        admin_client,
        ADMIN_TOKEN,
        **{"from": "2020-03-10T01:00:00+01:00", "to": "2020-03-11T00:00:00.000001Z"},
    )
    assert total_of(report["data"]) == Decimal("0.3")
    # A datetime without an offset is UTC.
    report = usage(admin_client, ADMIN_TOKEN, **{"from": "2020-03-10T00:00:01", "to": "2020-04-01"})
    assert total_of(report["data"]) == Decimal("0.2")


def test_bad_dates_and_ranges_are_422(admin_client: Any) -> None:
    for params, words in [
        ({"from": "yesterday"}, "from: 'yesterday' is not a date"),
        ({"from": "2020-02-01", "to": "2020-01-01"}, "must be before to"),
        ({"group_by": "week"}, "group_by"),
        # Absurd ranges name the field that makes them so.
        ({"from": "1970-01-01", "to": "2020-01-01"}, "from: 1970-01-01T00:00:00Z is outside"),
        ({"from": "2020-01-01", "to": "2200-01-01"}, "to: 2200-01-01T00:00:00Z is outside"),
        ({"from": "2001-01-01", "to": "2099-01-01"}, "to: the range from"),
    ]:
        response = admin_client.get("/v1/usage", params=params, headers=auth(ADMIN_TOKEN))
        assert response.status_code == 422, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert words in response.json()["error"]["message"]


def test_the_default_period_is_the_current_month(
    admin_client: Any, database_url: str, make_key: Any
) -> None:
    plain = make_key("this month")
    key = key_id_of(database_url, plain)
    now = utcnow()
    this_month = add_job(database_url, key, now, cost=("0.5", "0.25", "0", "0"))
    add_job(
        database_url, key, month_start(now) - timedelta(microseconds=1), cost=("9", "0", "0", "0")
    )
    report = usage(admin_client, plain)
    assert report["from"] == month_start(now).isoformat().replace("+00:00", "Z")
    assert report["to"] == next_month_start(now).isoformat().replace("+00:00", "Z")
    assert total_of(report["data"]) == recorded_total(database_url, [this_month])


def test_a_key_sees_its_own_usage_and_the_admin_everyones(
    admin_client: Any, january: dict[str, Any]
) -> None:
    alice = usage(admin_client, january["alice"], group_by="key", **january["range"])
    assert [row["key"]["name"] for row in alice["data"]] == ["alice"]
    assert alice["key_id"] == january["a"]
    # Its own id is fine; another key's is not.
    usage(admin_client, january["alice"], key_id=january["a"], **january["range"])
    refused = admin_client.get(
        "/v1/usage",
        params={"key_id": january["b"], **january["range"]},
        headers=auth(january["alice"]),
    )
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"

    everyone = usage(admin_client, ADMIN_TOKEN, group_by="key", **january["range"])
    assert [row["key"]["name"] for row in everyone["data"]] == ["alice", "bob"]
    only_bob = usage(
        admin_client, ADMIN_TOKEN, group_by="key", key_id=january["b"], **january["range"]
    )
    assert [row["key"]["name"] for row in only_bob["data"]] == ["bob"]
    # The x-api-key header works for the admin token too.
    response = admin_client.get(
        "/v1/usage", params=january["range"], headers={"x-api-key": ADMIN_TOKEN}
    )
    assert response.status_code == 200


def test_a_wrong_or_missing_admin_token_is_401(
    admin_client: Any, client: Any, january: dict[str, Any]
) -> None:
    for headers in [
        auth(ADMIN_TOKEN + "x"),
        auth(ADMIN_TOKEN[:-1]),
        auth("pq_not-a-key"),
        {},
    ]:
        response = admin_client.get("/v1/usage", params=january["range"], headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["type"] == "authentication_error"
    # Without PROMPTQ_ADMIN_TOKEN set, no token is the admin's.
    assert client.get("/v1/usage", headers=auth(ADMIN_TOKEN)).status_code == 401


def test_csv_has_a_header_row_and_exact_amounts(admin_client: Any, january: dict[str, Any]) -> None:
    response = admin_client.get(
        "/v1/usage",
        params={"group_by": "key", "format": "csv", **january["range"]},
        headers=auth(ADMIN_TOKEN),
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert list(rows[0]) == [
        "key_id",
        "key_name",
        "jobs",
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "cost_total",
        "cost_input",
        "cost_output",
        "cost_cache_write",
        "cost_cache_read",
    ]
    assert [(row["key_name"], row["jobs"]) for row in rows] == [("alice", "2"), ("bob", "2")]
    assert rows[1]["key_id"] == january["b"]
    assert rows[1]["cost_total"] == "3.395070900022"
    by_day = admin_client.get(
        "/v1/usage",
        params={"group_by": "day", "format": "csv", **january["range"]},
        headers=auth(ADMIN_TOKEN),
    ).text.splitlines()
    assert by_day[0].startswith("day,jobs,")
    year = january["year"]
    assert [line.split(",")[0] for line in by_day[1:]] == [
        f"{year}-01-01",
        f"{year}-01-02",
        f"{year}-01-31",
    ]


def test_real_jobs_add_up_exactly(
    client: Any, worker_process: Any, database_url: str, make_key: Any
) -> None:
    """Jobs run by the worker against the simulator: the report's rows add up to the jobs'
    recorded costs, exactly."""
    plain = make_key("real jobs")
    ids = []
    for index, model in enumerate([SONNET, SONNET, HAIKU]):
        response = client.post(
            "/v1/jobs",
            json={"prompt": f"usage report job {index} {uuid.uuid4().hex}", "model": model},
            headers=auth(plain),
        )
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    for job_id in ids:
        assert wait_for_status(client, plain, job_id, {"succeeded"})["cost"] is not None
    for group_by in ("model", "key", "day"):
        report = usage(client, plain, group_by=group_by)
        assert total_of(report["data"]) == recorded_total(database_url, ids)
        assert sum(row["jobs"] for row in report["data"]) == 3
    by_model = {row["model"]: row for row in usage(client, plain)["data"]}
    assert by_model[SONNET]["jobs"] == 2 and by_model[HAIKU]["jobs"] == 1
    for part in ("input", "output", "cache_write", "cache_read"):
        assert sum((Decimal(row["cost"][part]) for row in by_model.values()), Decimal(0)) == sum(
            (
                Decimal(client.get(f"/v1/jobs/{i}", headers=auth(plain)).json()["cost"][part])
                for i in ids
            ),
            Decimal(0),
        )


def run_cli(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    return run_promptq("usage", *args, env=clean_env(PROMPTQ_DATABASE_URL=database_url))


def test_the_cli_prints_an_aligned_table_with_a_total(
    database_url: str, january: dict[str, Any]
) -> None:
    year = january["year"]
    span = ("--from", f"{year}-01-01", "--to", f"{year}-02-01")
    table = run_cli("--by", "key", *span, database_url=database_url)
    lines = table.stdout.splitlines()
    assert lines[0] == (
        f"usage by key, {year}-01-01T00:00:00Z to {year}-02-01T00:00:00Z (exclusive)"
    )
    header = next(line for line in lines if line.startswith("KEY"))
    assert "JOBS" in header and header.rstrip().endswith("COST (USD)")
    alice = next(line for line in lines if line.startswith(f"alice ({january['a']})"))
    bob = next(line for line in lines if line.startswith(f"bob ({january['b']})"))
    total = next(line for line in lines if line.startswith("TOTAL"))
    # Right-aligned columns, costs padded to the same places: the lines end together.
    assert len(alice) == len(bob) == len(total) == len(header)
    assert alice.split()[-1] == "0.000696850000"
    assert bob.split()[-1] == "3.395070900022"
    assert total.split()[-1] == "3.395767750022"
    assert total.split()[1] == "4"  # jobs
    assert "654,355" in total  # output tokens, with thousands separators

    as_json = json.loads(run_cli(*span, "--json", database_url=database_url).stdout)
    assert {row["model"] for row in as_json["data"]} == {SONNET, HAIKU}
    assert as_json["total"]["cost"]["total"] == "3.395767750022"

    as_csv = run_cli("--by", "day", *span, "--csv", database_url=database_url)
    assert as_csv.stdout.splitlines()[0].startswith("day,jobs,input_tokens")
    assert len(as_csv.stdout.splitlines()) == 4

    empty = run_cli("--from", "2000-01-01", "--to", "2000-02-01", database_url=database_url)
    assert "no jobs with a recorded cost" in empty.stdout
