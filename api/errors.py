"""Every error a client sees has one shape: {"error": {"type": ..., "message": ...}}."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import exc as sqlalchemy_errors
from starlette.exceptions import HTTPException as StarletteHTTPException

from promptq.budgets import BudgetExceeded
from promptq.db import TRANSIENT_DATABASE_ERRORS
from promptq.jobs.errors import InvalidJob, JobConflict, JobError, JobNotFound
from promptq.validation import describe_validation_errors

STATUS_BY_ERROR: dict[type[JobError], int] = {
    InvalidJob: 400,
    BudgetExceeded: 402,
    JobNotFound: 404,
    JobConflict: 409,
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
        status = STATUS_BY_ERROR.get(type(exc), 400)
        return error_response(status, str(exc), exc.error_type, request=request)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = describe_validation_errors(list(exc.errors()), drop_prefix=("body", "query"))
        return error_response(422, message, request=request)

    @app.exception_handler(ValidationError)
    async def _model_invalid(request: Request, exc: ValidationError) -> JSONResponse:
        return error_response(422, describe_validation_errors(list(exc.errors())), request=request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "no such endpoint; see /docs for the API"
        if exc.status_code == 405:
            message = "method not allowed on this endpoint; see /docs for the API"
        headers = getattr(exc, "headers", None)
        return error_response(exc.status_code, message, headers=headers, request=request)
