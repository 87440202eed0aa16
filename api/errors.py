"""Every error a client sees has one shape: {"error": {"type": ..., "message": ...}}, with
`"type": "error"` on top on the Anthropic-compatible paths.

Domain errors come from one tree (promptq.errors): its root is mapped here once, with the
status and type each branch carries, so no route translates an error itself."""

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

from promptq.db import TRANSIENT_DATABASE_ERRORS
from promptq.errors import InvalidRequest, PromptqError, Unavailable
from promptq.jobspec.schemas import MAX_JSON_DEPTH, json_depth
from promptq.validation import describe_validation_errors

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


class ApiError(PromptqError):
    """An answer the edge decides on itself (a body it cannot read, a missing key), with
    its status given here rather than by a branch of the tree."""

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


def tree_error_response(exc: PromptqError, request: Request) -> JSONResponse:
    """The answer to an error of promptq.errors' tree, in the shape of the request's path."""
    status = answer_status(exc, request.url.path)
    return error_response(status, str(exc), exc.error_type, answer_headers(exc), request)


def dependency_unavailable(what: str, request: Request) -> JSONResponse:
    message = f"{what} is not answering right now, so nothing was done; retry in a few seconds"
    return tree_error_response(Unavailable(message), request)


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

    @app.exception_handler(PromptqError)
    async def _promptq_error(request: Request, exc: PromptqError) -> JSONResponse:
        return tree_error_response(exc, request)

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


def answer_status(exc: PromptqError, path: str) -> int:
    """The status an error of the tree is answered with on `path`: its branch's, except that
    a refused request follows the refusal rule (422 here, 400 on the Anthropic paths)."""
    return refusal_status(path) if isinstance(exc, InvalidRequest) else exc.status


def answer_headers(exc: PromptqError) -> dict[str, str] | None:
    """The headers that go with an error of the tree: the edge's own, and Retry-After when
    the error knows when to try again."""
    headers = dict(exc.headers or {}) if isinstance(exc, ApiError) else {}
    if exc.retry_after_seconds is not None:
        headers.setdefault("Retry-After", str(max(1, math.ceil(exc.retry_after_seconds))))
    return headers or None


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
