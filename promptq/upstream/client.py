"""The client for `POST {base_url}/v1/messages`: one call, one UpstreamResult, never a raise."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import urlencode
from urllib.request import getproxies, proxy_bypass

import certifi
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationValueError,
    NewConnectionError,
    ReadTimeoutError,
)

from promptq.tls import verifying_context
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
    """The innermost exception of urllib3's wrappers: the one that says why."""
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


def _url_problem(url: str) -> str | None:
    """Why `url` cannot be called at all (None: it can)."""
    try:
        parts = urllib3.util.parse_url(url)
    except LocationValueError as error:
        return str(error)
    if parts.scheme not in ("http", "https") or not parts.host:
        return "the URL must start with http:// or https:// and name a host"
    return None


def _connections(url: str, max_connections: int) -> urllib3.PoolManager:
    """The connection pool for the upstream at `url`: urllib3's own, without requests on
    top, whose per-call work (preparing the request, reading the environment again, building
    its response) cost a worker more CPU than the call itself. What requests would read from
    the environment is read here once: the proxy for the URL's scheme (HTTPS_PROXY, NO_PROXY)
    and the CA bundle (REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, else certifi's, as requests
    does), so that a deployment set up for requests works the same; the bundle is loaded
    once, into one TLS context for every connection (promptq.tls)."""
    ca_bundle = (
        os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()
    )
    # No urllib3 retries or redirects: the worker retries itself, with backoff and a record
    # of each; a redirect means a wrong base URL (promptq.upstream.classify says so).
    options: dict[str, Any] = {
        "num_pools": 2,
        "maxsize": max_connections,
        "retries": False,
        "ssl_context": verifying_context(ca_bundle),
    }
    parts = urllib3.util.parse_url(url)
    proxy = getproxies().get(parts.scheme or "")
    if proxy and not proxy_bypass(parts.host or ""):
        # An https:// proxy's certificate is checked against the same bundle, as requests
        # (and urllib3 given the bundle's path) would.
        return urllib3.ProxyManager(proxy, proxy_ssl_context=options["ssl_context"], **options)
    return urllib3.PoolManager(**options)


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
        self._unusable = _url_problem(self.url)
        # One pool for every call of the process: a worker's calls run in greenlets (or
        # threads), each one call at a time, and the pool hands each its own connection,
        # keeping up to `max_connections` open between calls (one more beyond them is
        # opened for its call and closed after). A pool per thread would be one per task
        # under gevent, and a new connection per call.
        self._http = _connections(self.url, max_connections) if self._unusable is None else None
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=timeout)
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
        if self._http is not None:
            self._http.clear()

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
        if self._http is None:
            return Exchange(None, {}, None, f"cannot be called ({self._unusable})")
        url = f"{self.base_url}{path}"
        if params:
            url = f"{url}?{urlencode(params)}"
        try:
            response = self._http.request(
                method,
                url,
                body=body,
                headers=headers,
                timeout=urllib3.Timeout(
                    connect=self.connect_timeout, read=min(timeout, self.timeout)
                ),
                redirect=False,
            )
        except (HTTPError, OSError, ValueError) as error:
            cause = self._redact(str(_root_cause(error)))
            return Exchange(None, {}, None, f"gave no answer ({cause})")
        content = response.data
        # Some gateways echo the key they refused; it must not reach promptq's client.
        text = self._redact(content.decode("utf-8", "replace"))
        try:
            payload = json.loads(text) if text.strip() else None
        except ValueError:
            payload = None
        headers = {name.lower(): value for name, value in response.headers.items()}
        if payload is None:
            shown = describe_body(content, response.headers.get("content-type", ""))
            described = f"answered {response.status} with {shown}"
            return Exchange(response.status, headers, None, described)
        return Exchange(response.status, headers, payload, None)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, REDACTED) if self._api_key else text

    def _call(self, params: dict[str, Any], beta: str | None = None) -> UpstreamResult:
        started = time.monotonic()
        try:
            body = json.dumps(params, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as error:
            return self._failure(Outcome.PERMANENT, "invalid_request", str(error), started)
        if self._http is None:
            text = f"cannot call the upstream at {self.base_url}: {self._unusable}"
            return self._failure(Outcome.PERMANENT, "configuration_error", text, started)
        try:
            response = self._http.request(
                "POST",
                self.url,
                body=body,
                headers={**self._headers, "anthropic-beta": beta} if beta else self._headers,
                timeout=self._timeout,
                redirect=False,
            )
        except NewConnectionError as error:
            # Before the timeouts: urllib3 makes a refused connection a kind of connect
            # timeout.
            text = f"connection to the upstream at {self.base_url} failed: {_root_cause(error)}"
            return self._failure(Outcome.TRANSIENT, "connection_error", text, started)
        except ConnectTimeoutError:
            text = (
                f"connecting to the upstream at {self.base_url} took over {self.connect_timeout}s"
            )
            return self._failure(Outcome.TRANSIENT, "timeout", text, started)
        except ReadTimeoutError:
            text = f"the upstream at {self.base_url} did not answer within {self.timeout}s"
            return self._failure(Outcome.TRANSIENT, "timeout", text, started)
        except (LocationValueError, ValueError) as error:
            # A header http.client refuses (a key with a line break), a URL it cannot use.
            text = f"cannot call the upstream at {self.base_url}: {error}"
            return self._failure(Outcome.PERMANENT, "configuration_error", text, started)
        except (HTTPError, OSError) as error:
            cause = _root_cause(error)
            text = f"connection to the upstream at {self.base_url} failed: {cause}"
            return self._failure(Outcome.TRANSIENT, "connection_error", text, started)
        return classify_response(
            response.status, response.headers, response.data, self._elapsed_ms(started)
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
