"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api.auth import forget_key, hear_key_changes
from api.auth_first import AuthenticateFirst
from api.body_limit import BodySizeLimit
from api.broker import BrokerCheck
from api.control_chars import RefuseControlCharacters
from api.errors import install_error_handlers
from api.intake import intake_line
from api.listener import FinishedJobs
from api.open_requests import OpenRequests
from api.routes import (
    batches,
    dashboard,
    health,
    jobs,
    messages,
    metrics,
    models,
    templates,
    usage,
    webhooks,
)
from api.routes.batches import BATCHES_PATH
from promptq.broker.celery_app import broker_url, create_celery
from promptq.broker.messenger import BrokerMessenger
from promptq.catalog import ModelCatalog
from promptq.config import Settings, get_settings
from promptq.jobspec.schemas import JobCreate
from promptq.outbox import Messenger
from promptq.pricing import PriceTable
from promptq.quotas import IntakeQuotas, UnfinishedJobs
from promptq.ratelimit.quota import RateQuota
from promptq.ratelimit.table import LimitTable
from promptq.redis_roles import redis_client, role_url
from promptq.upstream import UpstreamClient


def create_app(settings: Settings | None = None, messenger: Messenger | None = None) -> FastAPI:
    settings = settings or get_settings()
    # Refused here when a role has no Redis (its own URL, else PROMPTQ_REDIS_URL):
    # everything below may count on each (promptq.redis_roles says which holds what).
    broker_redis_url = broker_url(settings)
    limiter_url, events_url = role_url(settings, "limiter"), role_url(settings, "events")
    app = FastAPI(
        title="promptq",
        version="0.1.0",
        summary="A self-hosted job queue for LLM prompts.",
        docs_url="/docs",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.finished = FinishedJobs(
        events_url, on_key_changed=forget_key, on_hearing=hear_key_changes
    )
    # One Celery app (and so one producer pool) per API app. Its messenger sends what a
    # request's unit of work records (promptq.outbox) once it commits: each request's
    # session is bound to it (api.deps.request_session), not a process-wide one, since a
    # process may hold several apps (the tests do), each with its own broker.
    app.state.celery = create_celery(settings)
    app.state.messenger = messenger or BrokerMessenger(app.state.celery, redis_client(events_url))
    app.state.broker = BrokerCheck(broker_redis_url)
    limiter_redis = redis_client(limiter_url)
    app.state.quotas = RateQuota(limiter_redis)
    app.state.unfinished = UnfinishedJobs(limiter_redis)
    app.state.intake_quotas = IntakeQuotas(limiter_redis)
    app.state.open_requests = OpenRequests(
        settings.key_max_open_requests, settings.max_open_requests
    )
    app.state.upstream = UpstreamClient(
        settings.upstream_url,
        settings.upstream_key,
        timeout=settings.upstream_timeout_seconds,
        connect_timeout=settings.upstream_connect_timeout_seconds,
    )
    app.state.catalog = ModelCatalog(
        lambda params: app.state.upstream.exchange("GET", "/v1/models", params=params),
        PriceTable.load(settings.pricing_file),
        LimitTable.load(settings.limits_file),
    )
    # One batch create at a time per process: parsing holds about 12 MiB of memory per MB
    # of batch (README, Security), so two at once could pass the pod's memory limit; the
    # others wait with their bodies unread.
    app.state.batch_intake = asyncio.Semaphore(1)
    app.state.intake_line = intake_line(app, settings)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        limits_by_path={BATCHES_PATH: (settings.max_batch_bytes, "PROMPTQ_MAX_BATCH_BYTES")},
    )
    # Added last, so it runs first: a stranger's request is refused on its headers.
    app.add_middleware(AuthenticateFirst, database=settings)
    app.add_middleware(RefuseControlCharacters)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(jobs.router)
    app.include_router(webhooks.router)
    app.include_router(templates.router)
    app.include_router(messages.router)
    app.include_router(batches.router)
    app.include_router(models.router)
    app.include_router(usage.router)
    app.include_router(dashboard.router)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC_DIR), name="static")
    _document_manual_bodies(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    finished: FinishedJobs = app.state.finished
    finished.start()
    yield
    await finished.stop()


def _document_manual_bodies(app: FastAPI) -> None:
    """POST /v1/jobs reads JSON or a form itself, so FastAPI cannot see its body model;
    add that model's schema to the OpenAPI document by hand."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        definitions = JobCreate.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(definitions.pop("$defs", {}))
        components["JobCreate"] = definitions
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
