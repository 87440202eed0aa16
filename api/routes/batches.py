"""The Message Batches API, with Anthropic's paths, fields and semantics."""

from __future__ import annotations

from contextlib import closing
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.auth import request_caller
from api.bodies import parse_json_body
from api.broker import require_broker
from api.deps import ApiKeyDep, SessionDep, SettingsDep, request_session
from api.errors import ApiError
from api.intake import check_intake_rate
from promptq.batches import service
from promptq.batches.schemas import parse_batch_requests
from promptq.config import Settings
from promptq.db import get_sessionmaker
from promptq.jobspec.schemas import anthropic_beta
from promptq.models import ApiKey, BatchStatus

BATCHES_PATH = "/v1/messages/batches"
router = APIRouter(prefix=BATCHES_PATH, tags=["anthropic"])


def _base_url(request: Request) -> str:
    """PROMPTQ_PUBLIC_URL when set (behind a proxy the address the API saw may be an
    internal one), else the address the client called."""
    settings: Settings = request.app.state.settings
    return settings.public_url or str(request.base_url)


@router.post("", summary="Create a Message Batch")
async def create_batch(request: Request, settings: SettingsDep) -> JSONResponse:
    key = await request_caller(request, settings)
    async with request.app.state.batch_intake:
        raw = await request.body()
        body = await run_in_threadpool(_accept_batch, request, settings, key, raw)
        del raw
    return JSONResponse(body)


def _accept_batch(request: Request, settings: Settings, key: ApiKey, raw: bytes) -> dict[str, Any]:
    """Parse, validate, store in bulk and commit; one message for the whole batch goes once
    the commit is done (promptq.outbox)."""
    data = parse_json_body(raw, check_depth=False) if raw.strip() else None
    requests = parse_batch_requests(data)
    beta = anthropic_beta(request.headers.get("anthropic-beta"))
    require_broker(request.app.state.broker, "batch")
    check_intake_rate(request, settings, key)
    with closing(request_session(request, settings)) as session:
        view = service.create_batch(session, settings, key, requests, beta)
        session.commit()
        return view.to_api(_base_url(request))


@router.get("/{batch_id}", summary="Retrieve a Message Batch")
def retrieve_batch(
    batch_id: str, request: Request, session: SessionDep, key: ApiKeyDep
) -> dict[str, Any]:
    return service.get_batch(session, key, batch_id).to_api(_base_url(request))


@router.get("", summary="List Message Batches, newest first")
def list_batches(
    request: Request,
    session: SessionDep,
    key: ApiKeyDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    after_id: Annotated[str | None, Query(description="the page after this batch")] = None,
    before_id: Annotated[str | None, Query(description="the page before this batch")] = None,
) -> dict[str, Any]:
    views, has_more = service.list_batches(session, key, limit, after_id, before_id)
    data = [view.to_api(_base_url(request)) for view in views]
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


@router.post("/{batch_id}/cancel", summary="Cancel a Message Batch")
def cancel_batch(
    batch_id: str, request: Request, session: SessionDep, settings: SettingsDep, key: ApiKeyDep
) -> dict[str, Any]:
    view = service.cancel_batch(session, settings, key, batch_id)
    body = view.to_api(_base_url(request))
    session.commit()
    return body


@router.delete("/{batch_id}", summary="Delete an ended Message Batch")
def delete_batch(batch_id: str, session: SessionDep, key: ApiKeyDep) -> dict[str, Any]:
    service.delete_batch(session, key, batch_id)
    session.commit()
    return {"id": batch_id, "type": "message_batch_deleted"}


@router.get("/{batch_id}/results", summary="A Message Batch's results, as JSONL")
def batch_results(
    batch_id: str, session: SessionDep, settings: SettingsDep, key: ApiKeyDep
) -> StreamingResponse:
    view = service.get_batch(session, key, batch_id)
    if view.batch.processing_status != BatchStatus.ENDED:
        raise ApiError(
            400,
            f"message batch {batch_id} is still {view.batch.processing_status}; its results "
            "are ready once processing_status is `ended` (results_url is set then)",
        )
    lines = service.result_lines(get_sessionmaker(settings), batch_id)
    return StreamingResponse(lines, media_type="application/x-jsonl")
