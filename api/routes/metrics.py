"""GET /metrics: the whole deployment's figures in Prometheus's text format.

No authentication by default, as is the Prometheus convention (scrapers are configured
with a URL, and the endpoint is kept off the public network by where it listens or by the
proxy in front). Nothing here is per client (counts, tokens, costs and latencies by model
and status, never a key, a URL or a prompt), but spend and traffic are the operator's
business: with PROMPTQ_METRICS_TOKEN set, a scrape must send it as a bearer token
(Prometheus's `authorization: {credentials: ...}`).
"""

from __future__ import annotations

import hmac
import threading

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from api.auth import presented_key
from api.deps import SettingsDep
from api.errors import ApiError
from promptq.broker.publish import broker_backlog
from promptq.config import Settings
from promptq.metrics import PromptqCollector
from promptq.redis_roles import redis_client, role_url

router = APIRouter(tags=["health"])

# A scrape must fail fast when Redis is away (503), not hang until Prometheus gives up.
REDIS_TIMEOUT_SECONDS = 2.0
_build_lock = threading.Lock()


@router.get(
    "/metrics",
    summary="Prometheus metrics of the whole deployment",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
def metrics(request: Request, settings: SettingsDep) -> Response:
    _require_token(settings, presented_key(request))
    # Errors are the app's: a database or Redis outage becomes the usual 503.
    body = generate_latest(_registry(request.app, settings))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _require_token(settings: Settings, presented: str | None) -> None:
    if settings.metrics_token is None:
        return
    token = settings.metrics_token.get_secret_value()
    # Constant time, so how long a wrong guess takes tells nothing of the token.
    if presented is None or not hmac.compare_digest(presented.encode(), token.encode()):
        raise ApiError(
            401,
            "/metrics needs `Authorization: Bearer <PROMPTQ_METRICS_TOKEN>` on this server",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _registry(app: FastAPI, settings: Settings) -> CollectorRegistry:
    """One registry per app, built on the first scrape. Dedicated, not prometheus_client's
    global one: its process and platform collectors describe one API process, not the
    deployment, and tests build many apps in one process."""
    registry: CollectorRegistry | None = getattr(app.state, "metrics_registry", None)
    if registry is not None:
        return registry
    with _build_lock:
        registry = getattr(app.state, "metrics_registry", None)
        if registry is None:
            registry = CollectorRegistry()
            registry.register(_collector(app, settings))
            app.state.metrics_registry = registry
    return registry


def _collector(app: FastAPI, settings: Settings) -> PromptqCollector:
    # The limiter's state from its Redis; the broker's backlog from the broker's, through
    # the Celery app that knows where that is.
    client = redis_client(
        role_url(settings, "limiter"),
        socket_timeout=REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
    )
    # broker_backlog reads the queue names from the publishing Celery app's configuration.
    celery_app = app.state.celery
    return PromptqCollector(
        settings.database_url,
        client,
        broker_backlog=lambda: broker_backlog(celery_app),
        max_models=settings.metrics_max_models,
    )
