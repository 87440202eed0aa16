"""The whole HTTP API fuzzed from its own OpenAPI document: whatever a client sends,
promptq answers with a 4xx that says what was wrong, never a 5xx."""

from __future__ import annotations

import itertools
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis.errors import Unsatisfiable

from promptq.config import Settings

EXAMPLES_PER_OPERATION = 30


def test_no_request_gets_a_server_error(settings: Settings, api_key: str, make_key: Any) -> None:
    from decimal import Decimal

    from api.app import create_app

    # A second key, as a hostile tenant would hold one: with a budget (so every request
    # goes through the budget's checks too) and quotas it reaches at once.
    hostile = make_key("hostile", monthly_budget_usd=Decimal("0.000001"))
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    for operation, mode in itertools.product(operations, list(schemathesis.GenerationMode)):
        # Positive cases follow the schema; negative ones break it on purpose.
        @given(case=operation.as_strategy(generation_mode=mode))
        @examples(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: Any) -> None:
            wait = (case.query or {}).get("wait")
            if isinstance(wait, int) and wait > 1:
                case.query["wait"] = 1  # no worker runs here: a valid wait just runs out
            for headers in ({"x-api-key": api_key}, {"x-api-key": hostile}, {}):
                response = case.call(headers=headers)
                assert response.status_code < 500, (
                    case.method,
                    case.path,
                    case.body,
                    response.text[:300],
                )
                if response.status_code >= 400:
                    error = response.json()["error"]
                    assert error["type"] and error["message"]

        try:
            fuzz()
        except Unsatisfiable:
            # Nothing to break in an operation without parameters or body.
            assert mode is schemathesis.GenerationMode.NEGATIVE
            continue
