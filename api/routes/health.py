"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SettingsDep
from promptq.config import Settings
from promptq.db import get_engine
from promptq.redis_roles import RedisRole, client_for

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database and Redis answer")
def readyz(settings: SettingsDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        with get_engine(settings.database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    checks["redis"] = _redis_check(settings)
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


def _redis_check(settings: Settings) -> str:
    """Whether the Redis of every role answers, one ping per distinct server: "ok", else
    what failed and, where the roles are split, for which roles."""
    by_url: dict[str | None, list[RedisRole]] = {}
    for role, url in settings.redis_urls().items():
        by_url.setdefault(url, []).append(role)
    for roles in by_url.values():
        try:
            client = client_for(settings, roles[0], socket_timeout=2, socket_connect_timeout=2)
            try:
                client.ping()
            finally:
                client.close()
        except Exception as exc:
            which = "" if len(by_url) == 1 else f" ({', '.join(roles)})"
            return f"unavailable: {type(exc).__name__}{which}"
    return "ok"
