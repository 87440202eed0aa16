"""The README's endpoint table holds: every endpoint it names exists (with the query
parameters it names), and every status its `answers` column lists is what a request of
that kind gets, no more and no fewer. The refusal rule above the table (400 for a body
that is not JSON, 422 for anything refused once read, 400 on the Anthropic paths) is
walked over every endpoint that takes a body."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from helpers import Receiver, auth

from promptq.budgets.repository import BudgetRepository
from promptq.db import session_scope
from promptq.keys.service import authenticate
from promptq.models import Job, JobStatus

README = Path(__file__).resolve().parents[2] / "README.md"


@dataclass(frozen=True)
class Row:
    endpoints: list[str]  # as written: "POST /v1/jobs", "GET /v1/webhooks[/{id}]", ...
    statuses: list[int]

    @property
    def name(self) -> str:
        return self.endpoints[0]


def split_cells(line: str) -> list[str]:
    """A Markdown table row's cells; `\\|` inside a cell is a pipe, not a border."""
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [cell.strip().replace("\\|", "|") for cell in cells]


def endpoint_table() -> list[Row]:
    text = README.read_text()
    section = text[text.index("## The job API") :]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| endpoint |"))
    assert split_cells(lines[start]) == ["endpoint", "what it does", "answers"]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        endpoint_cell, _, answers = split_cells(line)
        rows.append(
            Row(
                endpoints=re.findall(r"`([^`]+)`", endpoint_cell),
                statuses=[int(code) for code in re.findall(r"`(\d{3})`", answers)],
            )
        )
    return rows


ROWS = endpoint_table()


def route_templates(schema: dict[str, Any]) -> set[tuple[str, str]]:
    """(method, path with every {param} as {}) for every operation of the OpenAPI document."""
    return {
        (method.upper(), re.sub(r"\{[^}]+\}", "{}", path))
        for path, item in schema["paths"].items()
        for method in item
    }


def served(client: Any, method: str, path: str) -> bool:
    """For a route left out of the OpenAPI document (the dashboard's pages): it answers
    something other than "no such endpoint" or "method not allowed"."""
    response = client.request(method, path.replace("{}", "x"))
    return response.status_code not in (404, 405) or "no such endpoint" not in response.text


def expand(endpoint: str) -> list[tuple[str | None, str, list[str]]]:
    """`GET /v1/webhooks[/{id}]` -> the (method, path, query names) it stands for;
    `/v1/messages/batches[...]` names the path and whatever follows it."""
    method, _, rest = endpoint.rpartition(" ")
    path, _, query = rest.partition("?")
    names = [pair.split("=")[0] for pair in query.split("&") if pair]
    path = path.replace("[...]", "")
    paths = [re.sub(r"\[([^\]]+)\]", "", path), re.sub(r"\[([^\]]+)\]", r"\1", path)]
    return [(method or None, re.sub(r"\{[^}]+\}", "{}", p), names) for p in dict.fromkeys(paths)]


def test_the_table_names_only_endpoints_that_exist(client: Any) -> None:
    schema = client.get("/openapi.json").json()
    routes = route_templates(schema)
    assert len(ROWS) >= 10
    for row in ROWS:
        assert row.statuses, f"{row.name}: the answers column lists no status"
        for endpoint in row.endpoints:
            for method, path, names in expand(endpoint):
                if method is None:
                    assert any(p == path or p.startswith(path + "/") for _, p in routes), path
                    continue
                exists = (method, path) in routes or served(client, method, path)
                assert exists, f"README names {endpoint}: no such route"
                if names:
                    operation = next(
                        op
                        for p, item in schema["paths"].items()
                        if re.sub(r"\{[^}]+\}", "{}", p) == path
                        for m, op in item.items()
                        if m == method.lower()
                    )
                    documented = {param["name"] for param in operation.get("parameters", [])}
                    assert set(names) <= documented, (endpoint, set(names) - documented)


# ---------------------------------------------------------------------------------------
# What each row's statuses mean, as requests


@dataclass
class Context:
    client: Any
    key: str
    database_url: str
    settings: Any
    make_key: Callable[..., str]
    receiver: Receiver

    def post_job(self, **body: Any) -> Any:
        return self.client.post("/v1/jobs", json={"prompt": "x", **body}, headers=auth(self.key))

    def queued_job(self, idempotency_key: str | None = None, max_tokens: int | None = None) -> str:
        """A job committed but never published: it stays queued whatever workers run."""
        from promptq.jobs import service
        from promptq.jobspec.schemas import JobCreate

        payload = JobCreate(prompt="queued", max_tokens=max_tokens, idempotency_key=idempotency_key)
        with session_scope(self.database_url) as session:
            record = authenticate(session, self.key)
            assert record is not None
            job = service.create_job(session, self.settings, record, payload)
            return job.job.id

    def finished_job_with_webhook(self) -> str:
        job = self.client.post(
            "/v1/jobs?wait=30",
            json={"prompt": f"{uuid.uuid4()} hook", "webhook_url": self.receiver.url},
            headers=auth(self.key),
        ).json()
        assert job["status"] == "succeeded", job
        return str(job["id"])

    def key_over_budget(self) -> str:
        """A key whose running job holds a reservation as large as its budget."""
        plain = self.make_key("broke", monthly_budget_usd=Decimal("0.01"))
        self.key, key = plain, self.key
        # Small, so that it fits the budget at intake; its reservation then fills the budget.
        running = self.queued_job(max_tokens=16)
        self.key = key
        with session_scope(self.database_url) as session:
            job = session.get(Job, running)
            assert job is not None
            job.status = JobStatus.RUNNING
            session.flush()
            BudgetRepository(session).reserve(running, job.api_key_id, Decimal("0.01"))
        return plain

    def template(self) -> str:
        name = f"t{uuid.uuid4().hex[:8]}"
        made = self.client.post(
            "/v1/templates",
            json={"name": name, "prompt": "Say {{ word }}"},
            headers=auth(self.key),
        )
        assert made.status_code == 201, made.text
        return name


Request = Callable[[Context], Any]

MESSAGE = {"model": "claude-sonnet-4-6", "max_tokens": 16}


def _messages(c: Context, **params: Any) -> Any:
    body = {**MESSAGE, "messages": [{"role": "user", "content": f"{uuid.uuid4()} hi"}], **params}
    return c.client.post("/v1/messages", json=body, headers=auth(c.key))


def _idempotent_twice(c: Context) -> Any:
    headers = {**auth(c.key), "Idempotency-Key": str(uuid.uuid4())}
    c.client.post("/v1/jobs", json={"prompt": "first"}, headers=headers)
    return c.client.post("/v1/jobs", json={"prompt": "second"}, headers=headers)


def _finished_again(c: Context) -> Any:
    """A retried request whose job has already ended: 200, the job as it ended. The job is
    never published, so no worker can start it before it is canceled."""
    key = str(uuid.uuid4())
    job = c.queued_job(idempotency_key=key)
    assert c.client.post(f"/v1/jobs/{job}/cancel", headers=auth(c.key)).status_code == 200
    headers = {**auth(c.key), "Idempotency-Key": key}
    return c.client.post("/v1/jobs", json={"prompt": "queued"}, headers=headers)


def _cancel_finished(c: Context) -> Any:
    job = c.finished_job_with_webhook()
    return c.client.post(f"/v1/jobs/{job}/cancel", headers=auth(c.key))


def _readyz_without_redis(c: Context) -> Any:
    from fastapi.testclient import TestClient

    from api.app import create_app

    away = c.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(away)) as client:
        return client.get("/readyz")


SCENARIOS: dict[str, dict[int, Request]] = {
    "POST /v1/jobs": {
        202: lambda c: c.post_job(),
        200: _finished_again,
        402: lambda c: c.client.post(
            "/v1/jobs", json={"prompt": "x"}, headers=auth(c.key_over_budget())
        ),
        409: _idempotent_twice,
        422: lambda c: c.post_job(promt="misspelt"),
    },
    "GET /v1/jobs/{id}": {
        200: lambda c: c.client.get(f"/v1/jobs/{c.queued_job()}", headers=auth(c.key)),
        404: lambda c: c.client.get("/v1/jobs/job_nosuch", headers=auth(c.key)),
    },
    "GET /v1/jobs?status=&limit=&after=&batch=&order=": {
        200: lambda c: c.client.get("/v1/jobs?order=finished&limit=5", headers=auth(c.key)),
        422: lambda c: c.client.get("/v1/jobs?status=done", headers=auth(c.key)),
    },
    "GET /v1/jobs/{id}/deliveries": {
        200: lambda c: c.client.get(f"/v1/jobs/{c.queued_job()}/deliveries", headers=auth(c.key)),
        404: lambda c: c.client.get("/v1/jobs/job_nosuch/deliveries", headers=auth(c.key)),
    },
    "POST /v1/jobs/{id}/redeliver": {
        202: lambda c: c.client.post(
            f"/v1/jobs/{c.finished_job_with_webhook()}/redeliver", headers=auth(c.key)
        ),
        404: lambda c: c.client.post("/v1/jobs/job_nosuch/redeliver", headers=auth(c.key)),
        409: lambda c: c.client.post(f"/v1/jobs/{c.queued_job()}/redeliver", headers=auth(c.key)),
    },
    "POST /v1/jobs/{id}/cancel": {
        200: lambda c: c.client.post(f"/v1/jobs/{c.queued_job()}/cancel", headers=auth(c.key)),
        404: lambda c: c.client.post("/v1/jobs/job_nosuch/cancel", headers=auth(c.key)),
        409: _cancel_finished,
    },
    "POST /v1/webhooks": {
        201: lambda c: c.client.post(
            "/v1/webhooks", json={"url": c.receiver.url}, headers=auth(c.key)
        ),
        200: lambda c: c.client.get("/v1/webhooks", headers=auth(c.key)),
        404: lambda c: c.client.delete("/v1/webhooks/whk_nosuch", headers=auth(c.key)),
        422: lambda c: c.client.post(
            "/v1/webhooks",
            json={"url": c.receiver.url, "events": ["job.done"]},
            headers=auth(c.key),
        ),
    },
    "POST /v1/templates": {
        201: lambda c: c.client.post(
            "/v1/templates",
            json={"name": f"n{uuid.uuid4().hex[:8]}", "prompt": "hi"},
            headers=auth(c.key),
        ),
        200: lambda c: c.client.get(f"/v1/templates/{c.template()}", headers=auth(c.key)),
        202: lambda c: c.client.post(
            f"/v1/templates/{c.template()}/jobs", json={"word": "hi"}, headers=auth(c.key)
        ),
        404: lambda c: c.client.get("/v1/templates/nosuch", headers=auth(c.key)),
        409: lambda c: c.client.post(
            "/v1/templates", json={"name": c.template(), "prompt": "again"}, headers=auth(c.key)
        ),
        422: lambda c: c.client.post(
            f"/v1/templates/{c.template()}/jobs", json={"other": 1}, headers=auth(c.key)
        ),
    },
    "GET /v1/usage?from=&to=&group_by=model|key|day": {
        200: lambda c: c.client.get("/v1/usage?group_by=day", headers=auth(c.key)),
        422: lambda c: c.client.get("/v1/usage?group_by=week", headers=auth(c.key)),
    },
    "POST /v1/messages": {
        200: _messages,
        400: lambda c: _messages(c, max_tokens=0),
    },
    "GET /v1/models?limit=&after_id=&before_id=": {
        200: lambda c: c.client.get("/v1/models?limit=2", headers=auth(c.key)),
        404: lambda c: c.client.get("/v1/models/no-such-model", headers=auth(c.key)),
    },
    "POST /v1/messages/count_tokens": {
        200: lambda c: c.client.post(
            "/v1/messages/count_tokens",
            json={"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "hi"}]},
            headers=auth(c.key),
        ),
    },
    "GET /healthz": {
        200: lambda c: c.client.get("/healthz"),
        503: _readyz_without_redis,
    },
    "GET /metrics": {200: lambda c: c.client.get("/metrics")},
    "GET /dashboard": {200: lambda c: c.client.get("/dashboard")},
}


def test_every_row_has_its_requests() -> None:
    """A status added to the README needs a request here, and one removed loses it."""
    assert {row.name: sorted(row.statuses) for row in ROWS} == {
        name: sorted(by_status) for name, by_status in SCENARIOS.items()
    }


CASES = [(row.name, status) for row in ROWS for status in row.statuses]


@pytest.fixture(scope="module")
def receiver() -> Any:
    made = Receiver()
    yield made
    made.server.shutdown()


@pytest.mark.parametrize(("row", "status"), CASES, ids=[f"{r} {s}" for r, s in CASES])
def test_each_status_the_table_lists(
    row: str,
    status: int,
    client: Any,
    api_key: str,
    database_url: str,
    settings: Any,
    make_key: Any,
    receiver: Receiver,
    worker_process: Any,
) -> None:
    context = Context(client, api_key, database_url, settings, make_key, receiver)
    response = SCENARIOS[row][status](context)
    assert response.status_code == status, response.text
    if status >= 400 and row != "GET /healthz":  # /readyz answers with its checks
        assert response.json()["error"]["message"]


# ---------------------------------------------------------------------------------------
# The refusal rule, over every endpoint that takes a body


BODY_ENDPOINTS = [
    ("/v1/jobs", {"prompt": "x", "promt": "misspelt"}),
    ("/v1/webhooks", {"url": "https://example.com/hook", "events": ["job.done"]}),
    ("/v1/templates", {"name": "bad name!", "prompt": "x"}),
    ("/v1/messages", {**MESSAGE, "messages": []}),
    ("/v1/messages/batches", {"requests": []}),
]


def _anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


KINDS = ["not JSON", "empty", "too deep", "a refused field", "a refused header"]
# /v1/webhooks and /v1/templates read no header but the key.
RULE_CASES = [
    (path, invalid, kind)
    for path, invalid in BODY_ENDPOINTS
    for kind in KINDS
    if not (kind == "a refused header" and path in ("/v1/webhooks", "/v1/templates"))
]


@pytest.mark.parametrize(
    ("path", "invalid", "kind"), RULE_CASES, ids=[f"{p} {k}" for p, _, k in RULE_CASES]
)
def test_the_refusal_rule(
    client: Any, api_key: str, path: str, invalid: dict[str, Any], kind: str
) -> None:
    import json

    headers = {**auth(api_key), "content-type": "application/json"}
    content = {
        "not JSON": b"{not json",
        "empty": b"",
        "too deep": b'{"prompt": "x", "metadata": ' + b'{"a": ' * 70 + b"1" + b"}" * 71,
        "a refused field": json.dumps(invalid).encode(),
        "a refused header": json.dumps(invalid).encode(),
    }[kind]
    if kind == "a refused header":
        # A valid body, a malformed header: the header alone is what is refused.
        content = json.dumps(_valid_body(path)).encode()
        headers["anthropic-beta"] = "not a beta name!"
    response = client.post(path, content=content, headers=headers)
    readable = kind in ("a refused field", "a refused header")
    expected = 422 if readable and not _anthropic(path) else 400
    assert response.status_code == expected, response.text
    body = response.json()
    if _anthropic(path):
        assert body["type"] == "error"  # Anthropic's shape
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


def _valid_body(path: str) -> dict[str, Any]:
    message = {**MESSAGE, "messages": [{"role": "user", "content": "x"}]}
    return {
        "/v1/jobs": {"prompt": "x"},
        "/v1/messages": message,
        "/v1/messages/batches": {"requests": [{"custom_id": "a", "params": message}]},
    }[path]


def test_query_parameters_and_idempotency_headers_follow_the_rule(
    client: Any, api_key: str
) -> None:
    refused = [
        client.get("/v1/jobs?status=done", headers=auth(api_key)),
        client.get("/v1/jobs?limit=0", headers=auth(api_key)),
        client.post(
            "/v1/jobs",
            json={"prompt": "x", "idempotency_key": "a"},
            headers={**auth(api_key), "Idempotency-Key": "b"},
        ),
    ]
    assert [r.status_code for r in refused] == [422, 422, 422]
    # The Anthropic paths answer 400 for a query they refuse, as Anthropic does.
    batches = client.get("/v1/messages/batches?limit=0", headers=auth(api_key))
    assert batches.status_code == 400 and batches.json()["type"] == "error"


# ---------------------------------------------------------------------------------------
# The job object example and the command table


def test_the_job_example_is_priced_as_promptq_prices_its_model() -> None:
    import json

    from promptq.pricing import PriceTable

    text = README.read_text()
    start = text.index("The job object:\n\n```json\n") + len("The job object:\n\n```json\n")
    example = json.loads(text[start : text.index("```", start)])
    prices = PriceTable.load(None).prices_for(example["model"])
    assert prices is not None and example["prices"]["pattern"] == prices.pattern
    usage, cost = example["usage"], example["cost"]
    per_token = Decimal(1_000_000)
    assert Decimal(cost["input"]) == usage["input_tokens"] * prices.input / per_token
    assert Decimal(cost["output"]) == usage["output_tokens"] * prices.output / per_token
    assert Decimal(cost["total"]) == Decimal(cost["input"]) + Decimal(cost["output"])


def command_table() -> dict[str, set[str]]:
    """`promptq ...` command -> the options its README row names."""
    text = README.read_text()
    section = text[text.index("## Command line") : text.index("## Configuration")]
    found: dict[str, set[str]] = {}
    for line in section.splitlines():
        if not line.startswith("| `promptq"):
            continue
        for usage in re.findall(r"`(promptq [^`]+)`", split_cells(line)[0]):
            words = usage.split()[1:]
            name = " ".join(w for w in words[:2] if re.fullmatch(r"[a-z][a-z-]*", w))
            if name.split()[0] not in {"keys", "db", "jobs"}:
                name = name.split()[0]
            found.setdefault(name, set()).update(re.findall(r"--[a-z][a-z-]*", usage))
    return found


def test_the_command_table_names_every_option_each_command_has() -> None:
    import click

    from promptq.cli.main import cli

    table = command_table()
    assert {"up", "api", "worker", "beat", "flower"} <= set(table)
    for name, documented in table.items():
        command: Any = cli
        for word in name.split():
            assert isinstance(command, click.Group)
            command = command.commands[word]
        options = {
            opt
            for param in command.params
            if isinstance(param, click.Option)
            for opt in param.opts + param.secondary_opts
            if opt.startswith("--") and opt != "--help"
        }
        assert documented <= options, (name, documented - options)
        if name != "simulate-upstream":  # its row names the main ones, then "..."
            assert options <= documented, f"promptq {name}: {options - documented} not in README"


def test_every_v1_endpoint_of_the_table_wants_a_key(client: Any) -> None:
    """The rule's `401`: no key, whatever else the request holds."""
    checked = 0
    for row in ROWS:
        for endpoint in row.endpoints:
            for method, path, _ in expand(endpoint):
                if method is None or not path.startswith("/v1/"):
                    continue
                response = client.request(method, path.replace("{}", "x"), json={})
                assert response.status_code == 401, (endpoint, response.text)
                assert response.json()["error"]["type"] == "authentication_error"
                checked += 1
    assert checked >= 15
