"""One error tree (promptq.errors), mapped once by api.errors: every error of the tree is
answered with its branch's status and type, in promptq's shape and in Anthropic's. No
processes: a bare FastAPI app with the API's error handlers."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import api
import promptq
from api.errors import ApiError, install_error_handlers
from promptq import errors
from promptq.batches.service import BatchNotFound
from promptq.budgets import BudgetExceeded
from promptq.budgets.priceable import NotPriceable
from promptq.budgets.service import BudgetState
from promptq.catalog import UnknownModel
from promptq.errors import PromptqError
from promptq.jobspec.errors import InvalidJob, JobConflict, JobNotFound
from promptq.keys.policy import ModelNotAllowed
from promptq.periods import PeriodError
from promptq.quotas import QuotaExceeded
from promptq.templates import TemplateError, TemplateExists, TemplateNotFound
from promptq.webhooks.subscriptions import SubscriptionError, SubscriptionNotFound

PROMPTQ_PATH = "/v1/jobs/raise"
ANTHROPIC_PATH = "/v1/messages/batches/raise"
# Raises the error at a path and returns the answer.
Answer = Callable[[BaseException, str], Any]
BRANCHES = (
    errors.InvalidRequest,
    errors.PermissionDenied,
    errors.PaymentRequired,
    errors.NotFound,
    errors.Conflict,
    errors.RateLimited,
    errors.Unavailable,
)

SPENT = BudgetState(Decimal(1), Decimal(1), Decimal(0), datetime(2027, 1, 1, tzinfo=UTC))
# What clients rely on (PRODUCT.md, the SDKs): these statuses and types never change.
CONTRACT: list[tuple[PromptqError, int, str]] = [
    (InvalidJob("x"), 422, "invalid_request_error"),
    (TemplateError("x"), 422, "invalid_request_error"),
    (SubscriptionError("x"), 422, "invalid_request_error"),
    (PeriodError("x"), 422, "invalid_request_error"),
    (BudgetExceeded("x", SPENT), 402, "budget_exceeded_error"),
    (NotPriceable("x"), 403, "permission_error"),
    (ModelNotAllowed("x"), 403, "permission_error"),
    (JobNotFound("x"), 404, "not_found_error"),
    (BatchNotFound("x"), 404, "not_found_error"),
    (TemplateNotFound("x"), 404, "not_found_error"),
    (SubscriptionNotFound("x"), 404, "not_found_error"),
    (UnknownModel("x"), 404, "not_found_error"),
    (JobConflict("x"), 409, "conflict_error"),
    (TemplateExists("x"), 409, "conflict_error"),
    (QuotaExceeded("x", 2.5), 429, "rate_limit_error"),
    (errors.Unavailable("x"), 503, "service_unavailable"),
]


def _raising_app() -> tuple[FastAPI, list[BaseException]]:
    app = FastAPI()
    install_error_handlers(app)
    pending: list[BaseException] = []

    async def raise_pending() -> None:
        raise pending.pop()

    for path in (PROMPTQ_PATH, ANTHROPIC_PATH):
        app.add_api_route(path, raise_pending)
    return app, pending


@pytest.fixture(scope="module")
def answer() -> Iterator[Answer]:
    app, pending = _raising_app()
    with TestClient(app, raise_server_exceptions=False) as client:

        def answer(error: BaseException, path: str) -> Any:
            pending.append(error)
            return client.get(path)

        yield answer


def _every_error_class() -> set[type[PromptqError]]:
    """Every subclass of the root in promptq and api (their modules imported first)."""
    for package in (promptq, api):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not module.name.endswith("__main__") and module.name != "api.main":
                importlib.import_module(module.name)

    def walk(cls: type[PromptqError]) -> Iterator[type[PromptqError]]:
        for subclass in cls.__subclasses__():
            yield subclass
            yield from walk(subclass)

    return set(walk(PromptqError))


def _instance(cls: type[PromptqError]) -> PromptqError:
    """An error of `cls` saying "refused", whatever its constructor asks for."""
    error = cls.__new__(cls)
    Exception.__init__(error, "refused")
    return error


@pytest.mark.parametrize(("error", "status", "error_type"), CONTRACT, ids=lambda v: repr(v))
def test_the_contract_statuses_and_types(
    answer: Answer, error: PromptqError, status: int, error_type: str
) -> None:
    response = answer(error, PROMPTQ_PATH)
    assert response.status_code == status
    assert response.json() == {"error": {"type": error_type, "message": "x"}}


def test_every_error_of_the_tree_is_answered_by_its_branch_in_both_shapes(answer: Answer) -> None:
    classes = _every_error_class() - {ApiError}
    assert {JobNotFound, BatchNotFound, TemplateExists, QuotaExceeded} <= classes
    for cls in sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        branch = next((b for b in BRANCHES if issubclass(cls, b)), None)
        assert branch is not None, f"{cls.__qualname__} is on no branch of promptq.errors"
        assert cls.status == branch.status, f"{cls.__qualname__} answers unlike its branch"
        for path, shape in ((PROMPTQ_PATH, {}), (ANTHROPIC_PATH, {"type": "error"})):
            response = answer(_instance(cls), path)
            expected = cls.status
            if issubclass(cls, errors.InvalidRequest):
                # The refusal rule: Anthropic answers a refused request with 400.
                expected = 400 if path == ANTHROPIC_PATH else 422
            assert response.status_code == expected, (cls.__qualname__, path)
            body = {**shape, "error": {"type": cls.error_type, "message": "refused"}}
            assert response.json() == body, (cls.__qualname__, path)


@pytest.mark.parametrize("path", [PROMPTQ_PATH, ANTHROPIC_PATH])
def test_retry_after_goes_with_what_may_succeed_later(answer: Answer, path: str) -> None:
    limited = answer(QuotaExceeded("slow down", 2.5), path)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "3"
    away = answer(errors.Unavailable("later"), path)
    assert away.status_code == 503 and away.headers["Retry-After"] == "5"
    missing = answer(JobNotFound("no"), path)
    assert "Retry-After" not in missing.headers


def test_the_edge_keeps_its_own_status_and_headers(answer: Answer) -> None:
    # An ApiError's status is its own: a 422 it chose stays a 422 on an Anthropic path.
    error = ApiError(422, "chosen", headers={"X-Why": "test"})
    response = answer(error, ANTHROPIC_PATH)
    assert response.status_code == 422 and response.headers["X-Why"] == "test"
    expected = {"type": "error", "error": {"type": "invalid_request_error", "message": "chosen"}}
    assert response.json() == expected


def test_the_errors_module_is_core() -> None:
    """Every layer raises from it, so it imports nothing of promptq (nor of the edges)."""
    tree = ast.parse(Path(errors.__file__).read_text())
    imported = {
        name
        for node in ast.walk(tree)
        for name in ([alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
        + ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
    }
    assert imported <= {"__future__"}, imported
