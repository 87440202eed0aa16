"""Request dependencies: settings, a database session, the calling key, the publisher."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.auth import caller, presented_key
from promptq.config import Settings
from promptq.db import get_sessionmaker
from promptq.models import ApiKey


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """A session per request. Routes that write commit explicitly, before they publish,
    so a job id never reaches the broker ahead of its row; anything else is rolled back."""
    session = get_sessionmaker(settings)()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_api_key(request: Request, session: SessionDep) -> ApiKey:
    return caller(session, presented_key(request))


ApiKeyDep = Annotated[ApiKey, Depends(get_api_key)]
