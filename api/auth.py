"""Who is calling: the API key presented, checked against its stored hash.

Every request needs its key, so a key found once is kept for a few seconds: this saves a
database round trip per request at intake rates of hundreds per second. A revocation or an
update is announced over Redis and the key is dropped at once (api.listener hears it); while
that subscription is down, one could go unheard, so the cache is not used then.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import threading
from contextlib import closing

from cachetools import TTLCache
from fastapi import Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError
from promptq.config import Settings
from promptq.db import Database, get_sessionmaker
from promptq.keys.service import KEY_PREFIX, authenticate
from promptq.models import ApiKey

KEY_CACHE_SECONDS = 5.0

_cache: TTLCache[str, ApiKey] = TTLCache(maxsize=10_000, ttl=KEY_CACHE_SECONDS)
_lock = threading.Lock()
_hearing_changes = False


def hear_key_changes(hearing: bool) -> None:
    """Whether this process now hears of revoked and updated keys; the cache is used only
    while it does."""
    global _hearing_changes
    with _lock:
        _hearing_changes = hearing
        if not hearing:
            _cache.clear()


def forget_key(key_id: str) -> None:
    """Drop a revoked or updated key from the cache: its next request reads it anew."""
    with _lock:
        for plain in [plain for plain, key in _cache.items() if key.id == key_id]:
            _cache.pop(plain, None)


def presented_key(request: Request) -> str | None:
    """The key from `Authorization: Bearer`, `x-api-key`, or Basic auth with the key as
    user name or password (for tools that only speak Basic, such as Zapier's polling)."""
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        if scheme.lower() == "basic" and token.strip():
            return _key_from_basic(token.strip())
    return request.headers.get("x-api-key") or None


def _key_from_basic(token: str) -> str | None:
    try:
        user, _, password = base64.b64decode(token, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    # Either half may carry it; a key is recognisable by its prefix.
    return next((part for part in (password, user) if part.startswith(KEY_PREFIX)), None)


def _require(plain: str | None) -> str:
    if plain is None:
        raise ApiError(
            401,
            "missing API key: send `Authorization: Bearer pq_...` or `x-api-key: pq_...` "
            "(or Basic auth with the key as password; create one with "
            "`promptq keys create NAME`)",
        )
    return plain


def cached_caller(plain: str | None) -> ApiKey | None:
    """The key behind `plain` if it was seen lately; None when the database must say."""
    plain = _require(plain)
    with _lock:
        return _cache.get(plain) if _hearing_changes else None


def caller(session: Session, plain: str | None) -> ApiKey:
    """The active key behind `plain`, or a 401 that says what to send."""
    plain = _require(plain)
    key = cached_caller(plain)
    if key is None:
        key = authenticate(session, plain)
        if key is None:
            raise ApiError(401, "invalid or revoked API key")
        # Detached, so it outlives this request's session; only its columns are read.
        session.expunge(key)
        with _lock:
            if _hearing_changes:
                _cache[plain] = key
    return key


async def request_caller(request: Request, database: Database) -> ApiKey:
    """The calling key for a route that reads its body itself: from the cache when it can,
    else one trip to the thread pool for the database."""
    plain = presented_key(request)
    cached = cached_caller(plain)
    if cached is not None:
        return cached
    return await run_in_threadpool(_caller_from_database, database, plain)


def _caller_from_database(database: Database, plain: str | None) -> ApiKey:
    with closing(get_sessionmaker(database)()) as session:
        return caller(session, plain)


def is_admin(settings: Settings, plain: str | None) -> bool:
    """Whether `plain` is the admin token (PROMPTQ_ADMIN_TOKEN); never while none is set.
    Compared in constant time, so how long a wrong guess takes tells nothing of the token."""
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not token or plain is None:
        return False
    return hmac.compare_digest(plain.encode(), token.encode())


def key_or_admin(session: Session, settings: Settings, plain: str | None) -> ApiKey | None:
    """For the endpoints an operator may read across keys: the calling key, or None for
    the admin token (`Authorization: Bearer <PROMPTQ_ADMIN_TOKEN>`); a 401 for anything
    else."""
    if is_admin(settings, plain):
        return None
    if plain is not None and not plain.startswith(KEY_PREFIX):
        raise ApiError(401, "invalid admin token or API key")
    return caller(session, plain)
