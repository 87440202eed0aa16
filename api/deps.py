"""Request dependencies: settings, a database session, the calling key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from sqlalchemy.orm import Session

from api.auth import caller, presented_key
from promptq import outbox, quotas
from promptq.config import Settings
from promptq.db import get_sessionmaker
from promptq.models import ApiKey


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def request_session(request: Request, settings: Settings, autocommit: bool = False) -> Session:
    """app_session for the request's app."""
    return app_session(request.app, settings, autocommit)


def app_session(app: FastAPI, settings: Settings, autocommit: bool = False) -> Session:
    """A session whose messages (promptq.outbox) the app's messenger sends once it commits:
    a job id never reaches the broker ahead of its row; and whose intake counts a key's
    unfinished jobs in Redis (promptq.quotas.UnfinishedJobs). `autocommit`: each statement
    commits on its own (promptq.db.session_scope)."""
    session = get_sessionmaker(settings, autocommit)()
    quotas.bind(session, app.state.unfinished)
    return outbox.bind(session, app.state.messenger)


def get_session(request: Request, settings: SettingsDep) -> Iterator[Session]:
    """A session per request. Routes that write commit explicitly; anything else is rolled
    back, and what it recorded to send with it."""
    session = request_session(request, settings)
    try:
        yield session
    finally:
        session.rollback()
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_api_key(request: Request, session: SessionDep) -> ApiKey:
    return caller(session, presented_key(request))


ApiKeyDep = Annotated[ApiKey, Depends(get_api_key)]
