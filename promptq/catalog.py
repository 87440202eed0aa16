"""The models promptq offers (`GET /v1/models`): the upstream's own list when it gives one,
else the models its price and limit tables name; in Anthropic's shape and paging.

The upstream's list is fetched at most once per LIST_TTL_SECONDS per process: model lists
change with releases, not by the minute, and a model picker opening should not be an
upstream call each time. An upstream without a list (CometAPI may answer 404, a proxy an
HTML page) is asked again after NO_LIST_TTL_SECONDS, so that a list it starts serving is
seen soon.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from promptq.errors import InvalidRequest, NotFound
from promptq.models import ApiKey
from promptq.patterns import longest_match
from promptq.pricing import PriceTable
from promptq.ratelimit.table import LimitTable
from promptq.upstream.client import Exchange

log = logging.getLogger(__name__)

LIST_TTL_SECONDS = 300.0
NO_LIST_TTL_SECONDS = 30.0
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
# Pages of the upstream's list followed at most: 20,000 models, far past any real list.
MAX_UPSTREAM_PAGES = 20
# A model from the tables has no release date promptq knows; Anthropic's shape needs one.
UNKNOWN_CREATED_AT = datetime(1970, 1, 1, tzinfo=UTC)
_GLOB = re.compile(r"[*?\[\]]")


class UnknownModel(NotFound, LookupError):
    pass


class BadCursor(InvalidRequest, ValueError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    id: str
    display_name: str
    created_at: datetime

    def to_api(self) -> dict[str, str]:
        created = self.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
        return {
            "type": "model",
            "id": self.id,
            "display_name": self.display_name,
            "created_at": created,
        }


@dataclass(frozen=True)
class ModelPage:
    models: list[ModelInfo]
    has_more: bool

    def to_api(self) -> dict[str, Any]:
        data = [model.to_api() for model in self.models]
        return {
            "data": data,
            "has_more": self.has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }


Fetch = Callable[[dict[str, str | int]], Exchange]


class ModelCatalog:
    """The models of one deployment; thread-safe (API routes run on a thread pool)."""

    def __init__(self, fetch: Fetch, prices: PriceTable, limits: LimitTable) -> None:
        self._fetch = fetch
        self._from_tables = models_from_tables(
            prices.patterns(), [entry.pattern for entry in limits.entries()]
        )
        self._lock = threading.Lock()
        self._cached: list[ModelInfo] | None = None
        self._expires = 0.0

    def models(self) -> list[ModelInfo]:
        """Every model, newest first (the tables' models in the tables' order)."""
        with self._lock:
            if time.monotonic() >= self._expires:
                listed = self._upstream_list()
                self._cached = listed
                ttl = LIST_TTL_SECONDS if listed is not None else NO_LIST_TTL_SECONDS
                self._expires = time.monotonic() + ttl
            return self._cached if self._cached is not None else self._from_tables

    def _upstream_list(self) -> list[ModelInfo] | None:
        found: list[ModelInfo] = []
        params: dict[str, str | int] = {"limit": MAX_LIMIT}
        for _ in range(MAX_UPSTREAM_PAGES):
            reply = self._fetch(params)
            page = _read_page(reply)
            if page is None:
                if not found:
                    why = reply.problem or f"answered {reply.status_code}"
                    log.info("the upstream's GET /v1/models %s; listing the tables' models", why)
                    return None
                break  # a later page failed: keep what came
            models, has_more = page
            found.extend(models)
            if not has_more or not models:
                break
            params = {"limit": MAX_LIMIT, "after_id": models[-1].id}
        return _unique(found)


def allowed_models(key: ApiKey, models: Sequence[ModelInfo]) -> list[ModelInfo]:
    """The models `key` may use (its allowlist, `promptq keys create --models`): the one
    place GET /v1/models filters by key."""
    if key.models is None:
        return list(models)
    return [model for model in models if longest_match(key.models, model.id) is not None]


def page_of(
    models: Sequence[ModelInfo], limit: int, after_id: str | None, before_id: str | None
) -> ModelPage:
    """Anthropic's paging: `limit` models after `after_id`, or the `limit` before
    `before_id`, keeping the list's order either way."""
    if after_id is not None and before_id is not None:
        raise BadCursor("give after_id or before_id, not both")
    ids = [model.id for model in models]
    if before_id is not None:
        end = _index(ids, before_id, "before_id")
        start = max(0, end - limit)
        return ModelPage(list(models[start:end]), has_more=start > 0)
    start = _index(ids, after_id, "after_id") + 1 if after_id is not None else 0
    end = min(len(models), start + limit)
    return ModelPage(list(models[start:end]), has_more=end < len(models))


def find(models: Iterable[ModelInfo], model_id: str) -> ModelInfo:
    for model in models:
        if model.id == model_id:
            return model
    raise UnknownModel(
        f"model: {model_id} is not offered through promptq; GET /v1/models lists the models "
        "this key may use"
    )


def _index(ids: list[str], model_id: str, field: str) -> int:
    try:
        return ids.index(model_id)
    except ValueError:
        raise BadCursor(
            f"{field}: no model {model_id!r} in the list; page with the first_id or last_id "
            "of a page GET /v1/models gave"
        ) from None


def models_from_tables(*pattern_lists: Iterable[str]) -> list[ModelInfo]:
    """The model names the price and limit tables give, in their order: a pattern names a
    model when, without a trailing `*`, it has no wildcard left and does not end in a
    separator (`claude-sonnet-4-6*` names `claude-sonnet-4-6`; `claude-*` names none)."""
    found: list[ModelInfo] = []
    for patterns in pattern_lists:
        for pattern in patterns:
            name = pattern.removesuffix("*")
            if name and not _GLOB.search(name) and name[-1] not in "-._":
                found.append(ModelInfo(name, display_name(name), UNKNOWN_CREATED_AT))
    return _unique(found)


def display_name(model_id: str) -> str:
    """`claude-sonnet-4-6` -> `Claude Sonnet 4.6`, `claude-3-5-haiku` -> `Claude 3.5 Haiku`:
    words capitalised, version numbers joined with dots."""
    words: list[str] = []
    for part in model_id.split("-"):
        if part.isdigit() and words and words[-1][-1:].isdigit() and len(part) < 8:
            words[-1] += f".{part}"  # a dated snapshot (20250929) stays a word of its own
        else:
            words.append(part[:1].upper() + part[1:])
    return " ".join(words)


def _unique(models: Iterable[ModelInfo]) -> list[ModelInfo]:
    seen: set[str] = set()
    kept = []
    for model in models:
        if model.id not in seen:
            seen.add(model.id)
            kept.append(model)
    return kept


def _read_page(reply: Exchange) -> tuple[list[ModelInfo], bool] | None:
    """A page of Anthropic's list, or of the OpenAI-style list some proxies serve (`object:
    model`, `created` in epoch seconds, no paging); None for anything else."""
    payload = reply.payload
    if reply.status_code != 200 or not isinstance(payload, dict):
        return None
    data = payload.get("data")
    if not isinstance(data, list):
        return None
    models = [model for model in (_read_model(item) for item in data) if model is not None]
    return models, payload.get("has_more") is True


def _read_model(item: Any) -> ModelInfo | None:
    if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
        return None
    model_id = item["id"]
    name = item.get("display_name")
    return ModelInfo(
        model_id,
        name if isinstance(name, str) and name else display_name(model_id),
        _created_at(item.get("created_at", item.get("created"))),
    )


def _created_at(value: Any) -> datetime:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            return UNKNOWN_CREATED_AT
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return UNKNOWN_CREATED_AT
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return UNKNOWN_CREATED_AT
