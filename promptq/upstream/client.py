"""The client for `POST {base_url}/v1/messages`: one call, one UpstreamResult, never a raise."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from promptq.upstream.classify import classify_response, describe_body
from promptq.upstream.result import REDACTED, Outcome, UpstreamResult

ANTHROPIC_VERSION = "2023-06-01"
# Connections kept open to the upstream: as many as a worker has calls in flight, which is
# its concurrency (the caller says); a call beyond them opens one more and closes it after.
DEFAULT_MAX_CONNECTIONS = 16
# Listing models and counting tokens are quick at the upstream; a client waits on them.
SIDE_CALL_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Exchange:
    """What one call of a side endpoint came to."""

    status_code: int | None  # None when no HTTP answer came
    headers: dict[str, str]
    payload: Any  # the JSON body, None when it was not JSON (or there was none)
    # Why there is no JSON answer, for a person to read after "the upstream at URL".
    problem: str | None


def _user_agent() -> str:
    try:
        return f"promptq/{version('promptq')}"
    except PackageNotFoundError:
        return "promptq"


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of requests' and urllib3's wrappers: the one that says why."""
    seen: set[int] = set()
    current = exc
    while id(current) not in seen:
        seen.add(id(current))
        reason = getattr(current, "reason", None)
        inner = [a for a in current.args if isinstance(a, BaseException)]
        following = (
            reason
            if isinstance(reason, BaseException)
            else inner[-1]
            if inner
            else current.__cause__
        )
        if following is None:
            break
        current = following
    return current


class UpstreamClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/v1/messages"
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._api_key = api_key or None
        # One session for every call of the process: a worker's calls run in greenlets (or
        # threads), each one call at a time, and urllib3's pool hands each its own
        # connection, keeping up to `max_connections` open between calls. A session per
        # thread would be one per task under gevent, and a new connection per call.
        self._http = requests.Session()
        # No urllib3 retries: the worker retries itself, with backoff and a record of each.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max_connections, max_retries=0)
        self._http.mount("http://", adapter)
        self._http.mount("https://", adapter)
        self._headers = {
            "anthropic-version": ANTHROPIC_VERSION,
            "content-type": "application/json",
            "accept": "application/json",
            "user-agent": _user_agent(),
        }
        if self._api_key:
            # CometAPI reads the bearer token, Anthropic reads x-api-key: send both.
            self._headers["authorization"] = f"Bearer {self._api_key}"
            self._headers["x-api-key"] = self._api_key

    def __repr__(self) -> str:  # the key stays out of reprs that end up in logs
        return f"UpstreamClient(base_url={self.base_url!r})"

    def close(self) -> None:
        """Close the connections kept open."""
        self._http.close()

    def create_message(self, params: dict[str, Any], beta: str | None = None) -> UpstreamResult:
        """One call; `beta`: the anthropic-beta header the job's client sent."""
        return self._call(params, beta).redacted(self._api_key)

    def exchange(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: bytes | None = None,
        beta: str | None = None,
        timeout: float = SIDE_CALL_TIMEOUT_SECONDS,
    ) -> Exchange:
        """One call of another endpoint (`/v1/models`, `/v1/messages/count_tokens`): no
        retries, never a raise; the key is cut out of whatever text comes back."""
        headers = {**self._headers, "anthropic-beta": beta} if beta else self._headers
        try:
            response = self._http.request(
                method,
                f"{self.base_url}{path}",
                params=params,
                data=body,
                headers=headers,
                timeout=(self.connect_timeout, min(timeout, self.timeout)),
                allow_redirects=False,
            )
            content = response.content
        except requests.exceptions.RequestException as error:
            cause = self._redact(str(_root_cause(error)))
            return Exchange(None, {}, None, f"gave no answer ({cause})")
        # Some gateways echo the key they refused; it must not reach promptq's client.
        text = self._redact(content.decode("utf-8", "replace"))
        try:
            payload = json.loads(text) if text.strip() else None
        except ValueError:
            payload = None
        headers = {name.lower(): value for name, value in response.headers.items()}
        if payload is None:
            shown = describe_body(content, response.headers.get("content-type", ""))
            described = f"answered {response.status_code} with {shown}"
            return Exchange(response.status_code, headers, None, described)
        return Exchange(response.status_code, headers, payload, None)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, REDACTED) if self._api_key else text

    def _call(self, params: dict[str, Any], beta: str | None = None) -> UpstreamResult:
        started = time.monotonic()
        try:
            body = json.dumps(params, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as error:
            return self._failure(Outcome.PERMANENT, "invalid_request", str(error), started)
        try:
            response = self._http.post(
                self.url,
                data=body,
                headers={**self._headers, "anthropic-beta": beta} if beta else self._headers,
                timeout=(self.connect_timeout, self.timeout),
                allow_redirects=False,
            )
            content = response.content
        except requests.exceptions.Timeout as error:
            connecting = isinstance(error, requests.exceptions.ConnectTimeout)
            text = (
                f"connecting to the upstream at {self.base_url} took over {self.connect_timeout}s"
                if connecting
                else f"the upstream at {self.base_url} did not answer within {self.timeout}s"
            )
            return self._failure(Outcome.TRANSIENT, "timeout", text, started)
        except (
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
            requests.exceptions.InvalidURL,
            requests.exceptions.InvalidHeader,
        ) as error:
            text = f"cannot call the upstream at {self.base_url}: {error}"
            return self._failure(Outcome.PERMANENT, "configuration_error", text, started)
        except requests.exceptions.RequestException as error:
            cause = _root_cause(error)
            text = f"connection to the upstream at {self.base_url} failed: {cause}"
            return self._failure(Outcome.TRANSIENT, "connection_error", text, started)
        return classify_response(
            response.status_code, response.headers, content, self._elapsed_ms(started)
        )

    @staticmethod
    def _elapsed_ms(started: float) -> int:
        return round((time.monotonic() - started) * 1000)

    def _failure(
        self, outcome: Outcome, error_type: str, error_message: str, started: float
    ) -> UpstreamResult:
        return UpstreamResult(
            outcome=outcome,
            status_code=None,
            latency_ms=self._elapsed_ms(started),
            request_id=None,
            message=None,
            error_type=error_type,
            error_message=error_message,
            retry_after=None,
            rate_limit_headers={},
        )
