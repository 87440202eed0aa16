"""POST /v1/messages, Anthropic-compatible: the official SDKs work with `base_url` pointed at
promptq. Each call is a job at high priority, under the same limits, retries and cost
records as any other; the answer is the upstream's message unchanged once the job has
finished, or its error in Anthropic's shape and status. `stream: true` is answered with
Anthropic's server-sent events once the job has finished (promptq.upstream.message_events
says why not sooner)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.auth import request_caller
from api.bodies import parse_json_body
from api.deps import SettingsDep
from api.errors import ApiError
from api.intake import read_job, take_in
from promptq.config import Settings
from promptq.db import Database, session_scope
from promptq.jobs import service
from promptq.jobspec.schemas import JobCreate, MessagesRequest, anthropic_beta
from promptq.keys.policy import quota
from promptq.models import ApiKey, JobStatus, Priority
from promptq.upstream.anthropic_errors import anthropic_error
from promptq.upstream.count_tokens import count_tokens
from promptq.upstream.message_events import message_events
from promptq.validation import describe_validation_errors

router = APIRouter(tags=["anthropic"])

# How often a waiting request checks that its client is still there.
DISCONNECT_CHECK_SECONDS = 1.0


async def read_messages_request(request: Request) -> tuple[MessagesRequest, bool]:
    """The parameters, and whether the client asked for a stream (the job itself never
    streams: see promptq.upstream.message_events)."""
    raw = await request.body()
    data = parse_json_body(raw) if raw.strip() else None
    if not isinstance(data, dict):
        raise ApiError(400, "body: must be a JSON object of Messages API parameters")
    stream = data.pop("stream", None)
    if stream not in (None, True, False):
        raise ApiError(400, "stream: must be true or false")
    try:
        return MessagesRequest.model_validate(data), bool(stream)
    except ValidationError as exc:
        # Anthropic answers invalid parameters with 400, not 422.
        raise ApiError(400, describe_validation_errors(list(exc.errors()))) from exc


@router.post("/v1/messages", summary="Create a message (Anthropic Messages API)")
async def create_message(request: Request, settings: SettingsDep) -> Response:
    key = await request_caller(request, settings)
    params, stream = await read_messages_request(request)
    payload = JobCreate(request=params, priority=Priority.HIGH)
    with request.app.state.open_requests.hold(key.id, quota(key, settings, "open_requests")):
        body = await take_in(request, settings, key, payload, None)
        job = await _await_job(request, settings, key, body)
    headers = {"request-id": job["id"], "x-promptq-job-id": job["id"]}
    if job["status"] == JobStatus.SUCCEEDED and stream:
        return StreamingResponse(
            message_events(job["result"]), media_type="text/event-stream", headers=headers
        )
    if job["status"] == JobStatus.SUCCEEDED:
        return JSONResponse(job["result"], headers=headers)
    if job["status"] == JobStatus.FAILED:
        error = job["error"] or {}
        status, error_body = anthropic_error(
            error.get("type"), error.get("message"), error.get("upstream_status")
        )
        return JSONResponse(error_body, status_code=status, headers=headers)
    raise ApiError(
        529,
        f"promptq could not start this request within {settings.messages_wait_seconds:g} s "
        f"(job {job['id']} waited for rate-limit budget and was canceled); retry later",
        "overloaded_error",
        headers=headers,
    )


@router.post("/v1/messages/count_tokens", summary="Count a prompt's tokens (not a job)")
async def count_message_tokens(request: Request, settings: SettingsDep) -> JSONResponse:
    await request_caller(request, settings)
    raw = await request.body()
    if not isinstance(parse_json_body(raw) if raw.strip() else None, dict):
        raise ApiError(400, "body: must be a JSON object of Messages API parameters")
    beta = request.headers.get("anthropic-beta")
    status, body = await run_in_threadpool(
        count_tokens, request.app.state.upstream, raw, anthropic_beta(beta)
    )
    return JSONResponse(body, status_code=status)


async def _await_job(
    request: Request, settings: Settings, key: ApiKey, job: dict[str, Any]
) -> dict[str, Any]:
    """Wait until the job is final. Past the wait, or when the client has gone, a job that
    has not started is canceled, so that it never costs anything."""
    deadline = time.monotonic() + settings.messages_wait_seconds
    with request.app.state.finished.watching(job["id"]) as watch:
        while not JobStatus(job["status"]).is_final:
            gone = await request.is_disconnected()
            if gone or time.monotonic() >= deadline:
                job = await run_in_threadpool(_cancel_unless_running, settings, key, job["id"])
                if gone or JobStatus(job["status"]).is_final:
                    return job
                # Running: its call is under way, bounded by the upstream timeout; giving
                # up now would pay for an answer nobody reads.
                deadline = float("inf")
            # Short pauses: a client that hangs up is noticed within a second; the job is
            # read only when it is announced finished or a look at the database is due.
            if await watch.pause(min(DISCONNECT_CHECK_SECONDS, deadline - time.monotonic())):
                job = await run_in_threadpool(read_job, settings, key, job["id"])
    return job


def _cancel_unless_running(database: Database, key: ApiKey, job_id: str) -> dict[str, Any]:
    with session_scope(database) as session:
        service.cancel_unless_started(session, key, job_id)
    return read_job(database, key, job_id)
