"""Every error a client sees has one shape: {"error": {"type": ..., "message": ...}}."""

from __future__ import annotations

import math
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import exc as sqlalchemy_errors
from starlette.exceptions import HTTPException as StarletteHTTPException

from promptq.budgets import BudgetExceeded
from promptq.budgets.priceable import NotPriceable
from promptq.db import TRANSIENT_DATABASE_ERRORS
from promptq.jobspec.errors import InvalidJob, JobConflict, JobError, JobNotFound
from promptq.jobspec.schemas import MAX_JSON_DEPTH, json_depth
from promptq.keys.policy import ModelNotAllowed
from promptq.quotas import QuotaExceeded
from promptq.validation import describe_validation_errors

STATUS_BY_ERROR: dict[type[JobError], int] = {
    InvalidJob: 422,
    BudgetExceeded: 402,
    NotPriceable: 403,
    ModelNotAllowed: 403,
    JobNotFound: 404,
    JobConflict: 409,
    QuotaExceeded: 429,
}
TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or TYPE_BY_STATUS.get(status, "api_error")
        self.headers = headers


# Anthropic's own endpoints answer errors in Anthropic's shape, which the SDKs parse.
ANTHROPIC_PATHS = ("/v1/messages", "/v1/models")


def refusal_status(path: str) -> int:
    """The status of a request that was read but is refused for what it asks (a field, a
    query parameter, a header): promptq's own API answers 422, the Anthropic-compatible
    paths 400, as Anthropic does and as its SDKs expect. A body that cannot be read as
    JSON at all is a 400 on both."""
    return 400 if path.startswith(ANTHROPIC_PATHS) else 422


def error_body(status: int, message: str, error_type: str | None, path: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {
        "error": {"type": error_type or TYPE_BY_STATUS.get(status, "api_error"), "message": message}
    }
    if path.startswith(ANTHROPIC_PATHS):
        # Anthropic's shape, which the SDKs parse: promptq's with `"type": "error"` on top.
        body = {"type": "error", **body}
    return body


def error_response(
    status: int,
    message: str,
    error_type: str | None = None,
    headers: dict[str, str] | None = None,
    request: Request | None = None,
) -> JSONResponse:
    path = request.url.path if request is not None else ""
    return JSONResponse(
        error_body(status, message, error_type, path), status_code=status, headers=headers
    )


RETRY_AFTER_SECONDS = "5"


def dependency_unavailable(what: str, request: Request | None = None) -> JSONResponse:
    return error_response(
        503,
        f"{what} is not answering right now, so nothing was done; retry in a few seconds",
        "service_unavailable",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
        request=request,
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(sqlalchemy_errors.DBAPIError)
    async def _database_error(request: Request, exc: sqlalchemy_errors.DBAPIError) -> JSONResponse:
        if isinstance(exc, TRANSIENT_DATABASE_ERRORS) or exc.connection_invalidated:
            return dependency_unavailable("the database", request)
        if isinstance(exc, sqlalchemy_errors.DataError) and "NUL" in str(exc.orig):
            # PostgreSQL text holds no NUL character: an id or cursor with one (`%00`) is
            # the client's mistake, not a server error.
            message = (
                "the request holds a NUL character (\\x00), which no id, name or text in "
                "promptq may contain; remove it"
            )
            return error_response(refusal_status(request.url.path), message, request=request)
        raise exc

    @app.exception_handler(sqlalchemy_errors.TimeoutError)
    async def _pool_timeout(request: Request, __: Exception) -> JSONResponse:
        return dependency_unavailable("the database", request)

    @app.exception_handler(redis.RedisError)
    async def _redis_error(request: Request, __: Exception) -> JSONResponse:
        return dependency_unavailable("Redis", request)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.error_type, exc.headers, request)

    @app.exception_handler(JobError)
    async def _job_error(request: Request, exc: JobError) -> JSONResponse:
        status = STATUS_BY_ERROR.get(type(exc), 422)
        if status == 422:
            status = refusal_status(request.url.path)
        headers = None
        if isinstance(exc, QuotaExceeded):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_seconds)))}
        return error_response(status, str(exc), exc.error_type, headers, request=request)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        unreadable = unreadable_body(errors, exc.body)
        if unreadable is not None:
            return error_response(400, unreadable, request=request)
        message = describe_validation_errors(errors, drop_prefix=("body", "query"))
        return error_response(refusal_status(request.url.path), message, request=request)

    @app.exception_handler(ValidationError)
    async def _model_invalid(request: Request, exc: ValidationError) -> JSONResponse:
        message = describe_validation_errors(list(exc.errors()))
        return error_response(refusal_status(request.url.path), message, request=request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "no such endpoint; see /docs for the API"
        if exc.status_code == 405:
            message = "method not allowed on this endpoint; see /docs for the API"
        headers = getattr(exc, "headers", None)
        return error_response(exc.status_code, message, headers=headers, request=request)


def unreadable_body(errors: list[Any], body: Any) -> str | None:
    """What a route that FastAPI parses saw when the body was not JSON at all (not valid
    JSON, nested too deep, or no body), said as the routes that parse their own body say
    it; None when the body was JSON and only its fields are refused."""
    if body is not None and json_depth(body) > MAX_JSON_DEPTH:
        return f"body nests deeper than {MAX_JSON_DEPTH} levels"
    for error in errors:
        if error.get("type") == "json_invalid":
            return f"body is not valid JSON: {error.get('ctx', {}).get('error', 'parse error')}"
        if error.get("type") == "missing" and tuple(error.get("loc", ())) == ("body",):
            return "empty body: send a JSON object"
    return None
