"""One tree for every error a caller can be told about.

The root, `PromptqError`, carries how the API answers it: an HTTP status and an error type
(the `type` of `{"error": {"type", "message"}}`); its message says what was wrong and what to
do. Each branch below is one answer, and every domain error is a subclass of the branch that
answers it, so `api/errors.py` maps the root once, for promptq's shape and Anthropic's, and
no route translates a domain error itself.

Core: this module imports nothing of promptq, so every layer may raise from it.
"""

from __future__ import annotations


class PromptqError(Exception):
    """Root of the tree: an error the API answers with `status` and `error_type`. A branch
    names both where it is declared: `class NotFound(PromptqError, status=404, ...)`."""

    status: int = 500
    error_type: str = "api_error"
    # When trying again may succeed, in seconds (the answer's Retry-After); None: not known.
    retry_after_seconds: float | None = None

    def __init_subclass__(cls, status: int | None = None, error_type: str | None = None) -> None:
        super().__init_subclass__()
        if status is not None:
            cls.status = status
        if error_type is not None:
            cls.error_type = error_type


class InvalidRequest(PromptqError, status=422, error_type="invalid_request_error"):
    """The request is refused for what it asks (a field, a parameter, a name). A 422 on
    promptq's own API; a 400 on the Anthropic-compatible paths, as Anthropic answers and its
    SDKs expect (api.errors.refusal_status)."""


class PermissionDenied(PromptqError, status=403, error_type="permission_error"):
    """The caller may not do this with its key (a model outside its allowlist, a request a
    budgeted key cannot be charged for)."""


# billing_error: Anthropic's type for its own 402.
class PaymentRequired(PromptqError, status=402, error_type="billing_error"):
    """Money stands in the way: nothing more may be spent until the caller acts."""


class NotFound(PromptqError, status=404, error_type="not_found_error"):
    """No such thing for this caller (another key's things are not found either)."""


class Conflict(PromptqError, status=409, error_type="conflict_error"):
    """The request contradicts the state of what it names or an earlier request."""


class RateLimited(PromptqError, status=429, error_type="rate_limit_error"):
    """Too much, too fast: worth asking again after `retry_after_seconds`."""

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


# What a client is told to wait when something promptq needs is away for a moment.
UNAVAILABLE_RETRY_AFTER_SECONDS = 5.0


class Unavailable(PromptqError, status=503, error_type="service_unavailable"):
    """Something promptq needs is not answering; nothing was done, and a retry in a few
    seconds may succeed."""

    def __init__(
        self, message: str, retry_after_seconds: float = UNAVAILABLE_RETRY_AFTER_SECONDS
    ) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
