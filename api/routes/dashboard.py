"""/dashboard: a server-rendered page of jobs by status, recent failures and spend.

A browser navigating to a page cannot send an Authorization header, so the page also takes
its credential (an API key, or PROMPTQ_ADMIN_TOKEN) from a cookie that its sign-in form
sets: HttpOnly so no script reads it, SameSite=Strict so no other site's page or form sends
it, and scoped to /dashboard so it never authenticates the JSON API. The headers the API
takes work too, for curl. A key sees its own jobs and spend; the admin token everyone's.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.orm import Session

from api.auth import key_or_admin, presented_key
from api.deps import SessionDep, SettingsDep
from api.errors import ApiError
from promptq.config import Settings
from promptq.metrics import LimiterState, read_limiter_state
from promptq.models import ApiKey
from promptq.reports.dashboard import LimiterReader, build_dashboard

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
COOKIE = "promptq_dashboard"
COOKIE_PATH = "/dashboard"
COOKIE_MAX_AGE = 12 * 3600  # a working day; signing in again is one paste
# Longer than any key or sensible token: refused before it is hashed or compared.
MAX_CREDENTIAL = 1024
# The page must render promptly when Redis is away; its limiter table says so instead.
REDIS_TIMEOUT_SECONDS = 2.0
SECURITY_HEADERS = {
    # The page holds a key's private data: never cached, never framed, nothing but its own
    # scripts and styles (the chart data is a JSON island, not a script).
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(prefix="/dashboard", tags=["dashboard"], include_in_schema=False)
templates = Environment(
    loader=PackageLoader("api", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _limiter_reader(request: Request, settings: Settings) -> LimiterReader | None:
    """The rate limiter's state from Redis; the page shows it as unavailable rather than
    failing when Redis does not answer."""
    if not settings.redis_url:
        return None
    client: redis.Redis | None = getattr(request.app.state, "dashboard_redis", None)
    if client is None:
        client = request.app.state.dashboard_redis = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        )

    def read(models: Iterable[str]) -> list[LimiterState] | None:
        try:
            return read_limiter_state(client, models)
        except redis.RedisError:
            return None

    return read


def _render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    html = templates.get_template(name).render(root=root, **context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def _sign_in_form(request: Request, status: int = 200, message: str | None = None) -> Response:
    return _render(request, "sign-in.html", status, message=message)


def _encode(credential: str) -> str:
    # Cookie values may not hold every character an admin token might: base64url does.
    return base64.urlsafe_b64encode(credential.encode()).decode().rstrip("=")


def _decode(value: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


def _who(session: Session, settings: Settings, credential: str | None) -> ApiKey | None:
    """The key behind `credential`, None for the admin token; ApiError 401 for anything
    else, including nothing at all."""
    if credential is not None and len(credential) > MAX_CREDENTIAL:
        raise ApiError(401, "credential too long")
    return key_or_admin(session, settings, credential)


@router.get("", response_class=HTMLResponse)
def dashboard(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    credential = presented_key(request)
    cookie = request.cookies.get(COOKIE)
    if credential is None and cookie is not None:
        credential = _decode(cookie) or ""
    if credential is None:
        return _sign_in_form(request)
    try:
        key = _who(session, settings, credential)
    except ApiError:
        response = _sign_in_form(
            request, 401, "That credential is not valid (a revoked key?). Sign in again."
        )
        response.delete_cookie(COOKIE, path=COOKIE_PATH)
        return response
    board = build_dashboard(
        session, key.id if key is not None else None, limiter=_limiter_reader(request, settings)
    )
    return _render(request, "dashboard.html", board=board, data=board.chart_data(), key=key)


@router.post("/sign-in", response_class=HTMLResponse)
def sign_in(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    credential: Annotated[str, Form()] = "",
) -> Response:
    credential = credential.strip()
    try:
        _who(session, settings, credential)
    except ApiError:
        # Never echoed back: the form comes back empty, whatever was pasted.
        return _sign_in_form(
            request,
            401,
            "That is not a valid API key or admin token. Paste a key (pq_...) made by "
            "promptq keys create, or the server's PROMPTQ_ADMIN_TOKEN.",
        )
    response = RedirectResponse(f"{request.scope.get('root_path', '')}/dashboard", 303)
    response.set_cookie(
        COOKIE,
        _encode(credential),
        max_age=COOKIE_MAX_AGE,
        path=COOKIE_PATH,
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/sign-out")
def sign_out(request: Request) -> Response:
    response = RedirectResponse(f"{request.scope.get('root_path', '')}/dashboard", 303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return response
