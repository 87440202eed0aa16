"""Request dependencies: settings, a database session, the calling key, the publisher."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import ApiError
from promptq.config import Settings
from promptq.db import get_sessionmaker
from promptq.keys.service import authenticate
from promptq.models import ApiKey


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """A session per request. Routes that write commit explicitly, before they publish,
    so a job id never reaches the broker ahead of its row; anything else is rolled back."""
    session = get_sessionmaker(settings.database_url)()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def presented_key(request: Request) -> str | None:
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return request.headers.get("x-api-key") or None


def get_api_key(request: Request, session: SessionDep) -> ApiKey:
    plain = presented_key(request)
    if plain is None:
        raise ApiError(
            401,
            "missing API key: send `Authorization: Bearer pq_...` or `x-api-key: pq_...` "
            "(create one with `promptq keys create NAME`)",
        )
    key = authenticate(session, plain)
    if key is None:
        raise ApiError(401, "invalid or revoked API key")
    return key


ApiKeyDep = Annotated[ApiKey, Depends(get_api_key)]
