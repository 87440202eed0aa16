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

from promptq.db import TRANSIENT_DATABASE_ERRORS
from promptq.jobs.errors import InvalidJob, JobConflict, JobError, JobNotFound

STATUS_BY_ERROR: dict[type[JobError], int] = {InvalidJob: 400, JobNotFound: 404, JobConflict: 409}
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


def error_response(
    status: int, message: str, error_type: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {
        "error": {"type": error_type or TYPE_BY_STATUS.get(status, "api_error"), "message": message}
    }
    return JSONResponse(body, status_code=status, headers=headers)


def describe_validation_errors(errors: list[Any], drop_prefix: tuple[str, ...] = ()) -> str:
    """Pydantic's errors as one sentence per field: `request.max_tokens: ...`."""
    parts = []
    for error in errors:
        location = [str(item) for item in error.get("loc", ()) if item not in drop_prefix]
        field = ".".join(location) or "body"
        message = str(error.get("msg", "is invalid"))
        message = message.removeprefix("Value error, ")
        parts.append(message if message.split(":")[0] in field else f"{field}: {message}")
    return "; ".join(parts)


RETRY_AFTER_SECONDS = "5"


def dependency_unavailable(what: str) -> JSONResponse:
    return error_response(
        503,
        f"{what} is not answering right now, so nothing was done; retry in a few seconds",
        "service_unavailable",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(sqlalchemy_errors.DBAPIError)
    async def _database_error(_: Request, exc: sqlalchemy_errors.DBAPIError) -> JSONResponse:
        if isinstance(exc, TRANSIENT_DATABASE_ERRORS) or exc.connection_invalidated:
            return dependency_unavailable("the database")
        raise exc

    @app.exception_handler(sqlalchemy_errors.TimeoutError)
    async def _pool_timeout(_: Request, __: Exception) -> JSONResponse:
        return dependency_unavailable("the database")

    @app.exception_handler(redis.RedisError)
    async def _redis_error(_: Request, __: Exception) -> JSONResponse:
        return dependency_unavailable("Redis")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.error_type, exc.headers)

    @app.exception_handler(JobError)
    async def _job_error(_: Request, exc: JobError) -> JSONResponse:
        return error_response(STATUS_BY_ERROR.get(type(exc), 400), str(exc), exc.error_type)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message = describe_validation_errors(list(exc.errors()), drop_prefix=("body", "query"))
        return error_response(422, message)

    @app.exception_handler(ValidationError)
    async def _model_invalid(_: Request, exc: ValidationError) -> JSONResponse:
        return error_response(422, describe_validation_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "no such endpoint; see /docs for the API"
        if exc.status_code == 405:
            message = "method not allowed on this endpoint; see /docs for the API"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))
