"""What one call of the upstream came to: the worker decides retries and records from this."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

REDACTED = "[redacted]"


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    TRANSIENT = "transient"  # worth retrying with backoff
    PERMANENT = "permanent"  # retrying cannot help


@dataclass(frozen=True)
class UpstreamResult:
    outcome: Outcome
    status_code: int | None  # None when no HTTP answer came (timeout, dropped connection)
    latency_ms: int
    request_id: str | None  # the upstream's request-id / x-request-id header
    message: dict[str, Any] | None  # the upstream message object, whole, on success
    error_type: str | None  # e.g. "overloaded_error", "timeout", "malformed_response"
    error_message: str | None  # the upstream's own message when it gave one
    retry_after: float | None  # seconds, from retry-after-ms or retry-after
    rate_limit_headers: dict[str, str]  # anthropic-ratelimit-* as received, names lowercased

    @property
    def succeeded(self) -> bool:
        return self.outcome is Outcome.SUCCEEDED

    def redacted(self, secret: str | None) -> UpstreamResult:
        """This result with `secret` cut out of every text an upstream or a library wrote.

        Some gateways echo the key they refused; the key must never reach a record or a log.
        The message is the model's answer to the user's own prompt, so it is left whole.
        """
        if not secret:
            return self

        def cut(text: str | None) -> str | None:
            return text.replace(secret, REDACTED) if text else text

        return replace(
            self,
            request_id=cut(self.request_id),
            error_type=cut(self.error_type),
            error_message=cut(self.error_message),
            rate_limit_headers={k: cut(v) or "" for k, v in self.rate_limit_headers.items()},
        )
