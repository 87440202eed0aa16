"""/dashboard: a server-rendered page of jobs by status, recent failures and spend.

A browser navigating to a page cannot send an Authorization header, so its sign-in form
(an API key, or PROMPTQ_ADMIN_TOKEN) starts a server-side session (api.dashboard_sessions)
whose random id goes in a cookie: HttpOnly so no script reads it, SameSite=Strict so no
other site's page or form sends it, Secure unless the page is plain http on loopback, and
scoped to /dashboard so it never authenticates the JSON API. Signing out ends the session.
Sign-in and sign-out refuse cross-site posts, and failed sign-ins are limited per client
address. The headers the API takes work too, for curl. A key sees its own jobs and spend;
the admin token everyone's.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.orm import Session

from api.auth import key_or_admin, presented_key
from api.dashboard_sessions import (
    DashboardSessions,
    Who,
    client_address,
    cookie_secure,
    cross_site_problem,
)
from api.deps import SessionDep, SettingsDep
from api.errors import ApiError
from promptq.config import Settings
from promptq.metrics import LimiterState, read_limiter_state
from promptq.models import ApiKey
from promptq.redis_roles import redis_client, role_url
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
    # Nothing leaves for other sites; same-origin posts keep a real Origin (under
    # no-referrer a browser sends "Origin: null", which sign-in could not tell from a forgery).
    "Referrer-Policy": "same-origin",
}

router = APIRouter(prefix="/dashboard", tags=["dashboard"], include_in_schema=False)
templates = Environment(
    loader=PackageLoader("api", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _limiter_reader(request: Request, settings: Settings) -> LimiterReader:
    """The rate limiter's state from Redis; the page shows it as unavailable rather than
    failing when Redis does not answer."""
    client: redis.Redis | None = getattr(request.app.state, "dashboard_redis", None)
    if client is None:
        client = request.app.state.dashboard_redis = redis_client(
            role_url(settings, "limiter"),
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


def _sessions(request: Request, settings: Settings) -> DashboardSessions:
    sessions: DashboardSessions | None = getattr(request.app.state, "dashboard_sessions", None)
    if sessions is None:
        # Sessions are promptq's own keys: on the limiter's Redis (promptq.redis_roles).
        sessions = DashboardSessions(role_url(settings, "limiter"), settings)
        request.app.state.dashboard_sessions = sessions
    return sessions


def _session_key(session: Session, sessions: DashboardSessions, session_id: str) -> Who | None:
    """Whom the cookie's session is for, if it is live and its key is still active."""
    who = sessions.find(session_id)
    if who is None or who.key_id is None:
        return who
    key = session.get(ApiKey, who.key_id)
    if key is None or key.revoked_at is not None:
        sessions.end(session_id)
        return None
    return who


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
    key: ApiKey | None
    if credential is not None:
        try:
            key = _who(session, settings, credential)
        except ApiError:
            return _sign_in_form(request, 401, "That credential is not valid (a revoked key?).")
    elif cookie is not None:
        who = _session_key(session, _sessions(request, settings), cookie)
        if who is None:
            response = _sign_in_form(
                request,
                401,
                "Your session has ended (signed out, expired or revoked). Sign in again.",
            )
            response.delete_cookie(COOKIE, path=COOKIE_PATH)
            return response
        key = session.get(ApiKey, who.key_id) if who.key_id is not None else None
    else:
        return _sign_in_form(request)
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
    refused = _cross_site(request)
    if refused is not None:
        return refused
    sessions = _sessions(request, settings)
    address = client_address(request, settings)
    wait = sessions.blocked_for(address)
    if wait is not None:
        response = _sign_in_form(
            request,
            429,
            f"Too many failed sign-ins from your address; try again in {wait} seconds.",
        )
        response.headers["Retry-After"] = str(wait)
        return response
    try:
        key = _who(session, settings, credential)
    except ApiError:
        sessions.failed(address)
        # Never echoed back: the form comes back empty, whatever was pasted.
        return _sign_in_form(
            request,
            401,
            "That is not a valid API key or admin token. Paste a key (pq_...) made by "
            "promptq keys create, or the server's PROMPTQ_ADMIN_TOKEN.",
        )
    session_id = sessions.start(Who(key.id if key is not None else None), COOKIE_MAX_AGE)
    response = RedirectResponse(f"{request.scope.get('root_path', '')}/dashboard", 303)
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=COOKIE_MAX_AGE,
        path=COOKIE_PATH,
        secure=cookie_secure(request, settings),
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/sign-out")
def sign_out(request: Request, settings: SettingsDep) -> Response:
    refused = _cross_site(request)
    if refused is not None:
        return refused
    cookie = request.cookies.get(COOKIE)
    if cookie is not None:
        _sessions(request, settings).end(cookie)
    response = RedirectResponse(f"{request.scope.get('root_path', '')}/dashboard", 303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return response


def _cross_site(request: Request) -> Response | None:
    problem = cross_site_problem(request)
    if problem is None:
        return None
    return _sign_in_form(
        request, 403, f"Refused: this form was posted from another site ({problem})."
    )
