"""What a Message Batch create may carry, checked as Anthropic checks it.

The batch's shape (a list of `custom_id` + `params`, ids unique) is refused at once with a
400; each request's `params` is validated on its own, and an invalid one becomes an
`errored` result rather than refusing the other 99,999 (Anthropic's semantics too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from promptq.jobspec.errors import InvalidJob
from promptq.jobspec.schemas import MessagesRequest
from promptq.validation import control_character_problem, describe_validation_errors

MAX_BATCH_REQUESTS = 100_000
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass(frozen=True)
class BatchRequest:
    custom_id: str
    # The upstream params when valid; otherwise the raw params and why they are invalid.
    params: dict[str, Any]
    model: str
    error: str | None = None


def parse_batch_requests(body: Any) -> list[BatchRequest]:
    if not isinstance(body, dict):
        raise InvalidJob("body: must be a JSON object with `requests`")
    unknown = sorted(set(body) - {"requests"})
    if unknown:
        raise InvalidJob(f"{', '.join(unknown)}: unknown field; a batch has only `requests`")
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        raise InvalidJob("requests: a non-empty list of {custom_id, params} objects")
    if len(requests) > MAX_BATCH_REQUESTS:
        raise InvalidJob(
            f"requests: {len(requests)} requests, more than the {MAX_BATCH_REQUESTS} a batch "
            "may hold; split them into several batches"
        )
    seen: set[str] = set()
    parsed = []
    for index, item in enumerate(requests):
        where = f"requests.{index}"
        if not isinstance(item, dict) or set(item) != {"custom_id", "params"}:
            raise InvalidJob(f"{where}: must be an object with exactly `custom_id` and `params`")
        custom_id, params = item["custom_id"], item["params"]
        if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
            raise InvalidJob(
                f"{where}.custom_id: 1 to 64 letters, digits, `_` or `-`, got {custom_id!r}"
            )
        if custom_id in seen:
            raise InvalidJob(
                f"{where}.custom_id: {custom_id!r} is used twice; custom ids must be unique "
                "within a batch"
            )
        seen.add(custom_id)
        if not isinstance(params, dict):
            raise InvalidJob(f"{where}.params: must be an object of Messages API parameters")
        parsed.append(_parse_params(custom_id, params))
    return parsed


def _parse_params(custom_id: str, params: dict[str, Any]) -> BatchRequest:
    model = params.get("model") if isinstance(params.get("model"), str) else None
    if model is not None and control_character_problem(model):
        model = None  # stored with the request's error, so it must be one PostgreSQL takes
    if params.get("stream"):
        return BatchRequest(custom_id, params, model or "", "stream: batch requests cannot stream")
    try:
        valid = MessagesRequest.model_validate(params)
    except ValidationError as exc:
        return BatchRequest(
            custom_id, params, model or "", describe_validation_errors(list(exc.errors()))
        )
    return BatchRequest(custom_id, valid.to_upstream(), valid.model)
