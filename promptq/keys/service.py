"""Client API keys: created once (the plain key and webhook secret are shown then and never
again), stored hashed, revoked by id or name."""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from promptq.errors import InvalidRequest
from promptq.ids import new_id
from promptq.keys.repository import ApiKeyRepository
from promptq.models import ApiKey

KEY_PREFIX = "pq_"
WEBHOOK_SECRET_PREFIX = "whsec_"


class ApiKeyError(InvalidRequest, ValueError):
    """A key operation that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class CreatedKey:
    record: ApiKey
    key: str
    webhook_secret: str


def hash_key(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()


def create_key(
    session: Session,
    name: str,
    rpm: int | None = None,
    monthly_budget_usd: Decimal | None = None,
    models: list[str] | None = None,
    quotas: dict[str, float | int] | None = None,
) -> CreatedKey:
    name = name.strip()
    if not name:
        raise ApiKeyError("a key needs a non-empty name")
    if rpm is not None and rpm < 1:
        raise ApiKeyError("--rpm must be a positive number of requests per minute")
    if monthly_budget_usd is not None:
        check_budget_amount(monthly_budget_usd)
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    # Standard Webhooks secrets are `whsec_` + base64 of the raw HMAC key.
    webhook_secret = WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()
    record = ApiKey(
        id=new_id("key"),
        name=name,
        key_hash=hash_key(plain),
        key_prefix=plain[:10],
        webhook_secret=webhook_secret,
        rpm=rpm,
        monthly_budget_usd=monthly_budget_usd,
        models=models,
        quotas=quotas or None,
    )
    ApiKeyRepository(session).add(record)
    return CreatedKey(record=record, key=plain, webhook_secret=webhook_secret)


# Money columns hold integer picodollars in a signed 64-bit integer.
MAX_BUDGET_USD = Decimal(9_000_000)


def check_budget_amount(amount: Decimal) -> None:
    """A monthly budget must be a positive amount of US dollars that money columns can hold:
    at most 12 decimal places (a picodollar) and under 9 million."""
    if not isinstance(amount, Decimal) or not amount.is_finite() or amount <= 0:
        raise ApiKeyError(f"--monthly-budget must be more than 0 US dollars, got {amount}")
    if amount > MAX_BUDGET_USD:
        raise ApiKeyError(f"--monthly-budget must be at most {MAX_BUDGET_USD} US dollars")
    if amount != amount.quantize(Decimal("1e-12")):
        raise ApiKeyError("--monthly-budget has more than 12 decimal places; round it")


def authenticate(session: Session, plain: str) -> ApiKey | None:
    """The active key behind a presented secret, or None."""
    if not plain.startswith(KEY_PREFIX):
        return None
    record = ApiKeyRepository(session).by_hash(hash_key(plain))
    if record is None or record.revoked_at is not None:
        return None
    return record


# "Leave as it is", for update_key's arguments (None means "remove").
UNCHANGED: Any = object()


def update_key(
    session: Session,
    ident: str,
    rpm: Any = UNCHANGED,
    monthly_budget_usd: Any = UNCHANGED,
    models: Any = UNCHANGED,
    quotas: dict[str, float | int | None] | None = None,
) -> ApiKey:
    """Change what a key may do; each argument left UNCHANGED stays, None removes it. In
    `quotas`, a value sets the key's own quota and None gives it the server's again."""
    key = find_key(session, ident)
    if key.revoked_at is not None:
        raise ApiKeyError(f"key {key.id} ({key.name}) is revoked; create a new one instead")
    if rpm is not UNCHANGED:
        if rpm is not None and rpm < 1:
            raise ApiKeyError("--rpm must be a positive number of requests per minute")
        key.rpm = rpm
    if monthly_budget_usd is not UNCHANGED:
        if monthly_budget_usd is not None:
            check_budget_amount(monthly_budget_usd)
        key.monthly_budget_usd = monthly_budget_usd
    if models is not UNCHANGED:
        key.models = models
    if quotas:
        merged = dict(key.quotas or {})
        for name, value in quotas.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = value
        key.quotas = merged or None
    session.flush()
    return key


def find_key(session: Session, ident: str) -> ApiKey:
    """The one key with this id or name."""
    matches = ApiKeyRepository(session).by_id_or_name(ident)
    if not matches:
        raise ApiKeyError(f"no key with id or name {ident!r}; `promptq keys list` shows them")
    if len(matches) > 1:
        raise ApiKeyError(f"several keys are named {ident!r}; name it by id instead")
    return matches[0]
