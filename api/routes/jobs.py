"""/v1/jobs: create, read, list, cancel."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.auth import request_caller
from api.bodies import TOO_DEEP, parse_json_body
from api.deps import ApiKeyDep, SessionDep, SettingsDep
from api.errors import ApiError, describe_validation_errors
from api.intake import FORM_TYPES, read_job, take_in
from promptq.db import Database
from promptq.jobs import service
from promptq.jobspec.presenter import job_to_api
from promptq.jobspec.schemas import MAX_JSON_DEPTH, JobCreate, json_depth
from promptq.keys.policy import quota
from promptq.models import ApiKey, JobStatus
from promptq.quotas import QuotaExceeded
from promptq.webhooks import deliveries

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


async def read_job_create(request: Request) -> JobCreate:
    """The body as JSON, or as a form for tools that only post flat fields."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in FORM_TYPES:
        form = await request.form()
        data: Any = {name: value for name, value in form.items() if isinstance(value, str)}
        if "metadata" in data:
            try:
                data["metadata"] = json.loads(data["metadata"])
            except ValueError as exc:
                raise ApiError(
                    422, "metadata: must be a JSON object when sent as a form field"
                ) from exc
            if json_depth(data) > MAX_JSON_DEPTH:
                raise ApiError(400, TOO_DEEP)
    else:
        raw = await request.body()
        if not raw.strip():
            raise ApiError(400, "empty body: send a JSON object with `prompt` or `request`")
        data = parse_json_body(raw)
    if not isinstance(data, dict):
        raise ApiError(422, "body: must be a JSON object")
    try:
        return JobCreate.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, describe_validation_errors(list(exc.errors()))) from exc


@router.post(
    "",
    status_code=202,
    summary="Create a job",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}},
                "application/x-www-form-urlencoded": {
                    "schema": {"$ref": "#/components/schemas/JobCreate"}
                },
            },
        }
    },
)
async def create_job(
    request: Request,
    settings: SettingsDep,
    wait: Annotated[int, Query(ge=0, le=60, description="seconds to hold the answer")] = 0,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    key = await request_caller(request, settings)
    payload = await read_job_create(request)
    if not wait:
        body = await take_in(request, settings, key, payload, idempotency_key)
    else:
        with request.app.state.open_requests.hold(key.id, quota(key, settings, "open_requests")):
            body = await take_in(request, settings, key, payload, idempotency_key)
            if not JobStatus(body["status"]).is_final:
                body = await wait_for_final(request, settings, key, body["id"], wait)
    status = 200 if JobStatus(body["status"]).is_final else 202
    return JSONResponse(body, status_code=status, headers={"Location": f"/v1/jobs/{body['id']}"})


async def wait_for_final(
    request: Request, database: Database, key: ApiKey, job_id: str, seconds: float
) -> dict[str, Any]:
    """The job once it is final, or as it is when time runs out. Woken by the worker's
    word that it finished (api.listener), and looking at the database now and then."""
    deadline = time.monotonic() + seconds
    with request.app.state.finished.watching(job_id) as watch:
        while True:
            body = await run_in_threadpool(read_job, database, key, job_id)
            left = deadline - time.monotonic()
            if JobStatus(body["status"]).is_final or left <= 0:
                return body
            await watch.pause(left)


@router.get("/{job_id}", summary="Get a job")
def get_job(job_id: str, session: SessionDep, key: ApiKeyDep) -> dict[str, Any]:
    return job_to_api(service.get_job(session, key, job_id))


@router.get("", summary="List jobs, newest first (or most recently finished first)")
def list_jobs(
    session: SessionDep,
    key: ApiKeyDep,
    status: Annotated[str | None, Query(description="only jobs in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    batch: Annotated[
        str | None,
        Query(description="a message batch's id: only its requests; `none`: no batch requests"),
    ] = None,
    order: Annotated[
        str,
        Query(
            description="`created` (newest first) or `finished` (finished jobs only, the most "
            "recently finished first: what a polling trigger wants)"
        ),
    ] = "created",
) -> dict[str, Any]:
    page = service.list_jobs(session, key, status, limit, after, batch, order)
    return {
        "data": [job_to_api(job) for job in page.jobs],
        "has_more": page.has_more,
        "next_cursor": page.next_cursor,
    }


@router.post("/{job_id}/cancel", summary="Cancel a queued or waiting job")
def cancel_job(job_id: str, session: SessionDep, key: ApiKeyDep) -> dict[str, Any]:
    job = service.cancel_job(session, key, job_id)
    session.commit()
    return job_to_api(job)


@router.get("/{job_id}/deliveries", summary="Webhook deliveries of a job, with every attempt")
def job_deliveries(job_id: str, session: SessionDep, key: ApiKeyDep) -> dict[str, Any]:
    job = service.get_job(session, key, job_id)
    return {"data": deliveries.for_job(session, job.id)}


@router.post("/{job_id}/redeliver", status_code=202, summary="Send a job's webhook again")
def redeliver(
    job_id: str, request: Request, session: SessionDep, settings: SettingsDep, key: ApiKeyDep
) -> dict[str, Any]:
    job = service.get_job(session, key, job_id)
    quotas = request.app.state.quotas
    per_minute = quota(key, settings, "redeliveries_per_minute")
    # The whole minute's worth may go at once: a receiver back from an outage.
    wait = quotas.take("redeliver", key.id, per_minute, 60.0)
    if wait > 0:
        raise QuotaExceeded(
            f"this API key asks for more than {per_minute} redeliveries a minute "
            "(PROMPTQ_KEY_MAX_REDELIVERIES_PER_MINUTE); wait, or check the receiver",
            wait,
        )
    delivery = deliveries.redeliver(session, job)
    if delivery is None:
        raise ApiError(
            409,
            f"job {job.id} has sent no webhook of its own yet (it has no webhook_url, or has "
            "not finished); redeliver sends only that one again, while deliveries to "
            "subscriptions are retried on their own schedule",
        )
    session.commit()
    return {"id": delivery.id, "event_id": delivery.event_id, "status": delivery.status}
