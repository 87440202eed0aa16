"""Posting one webhook: one attempt, one DeliveryResult, never a raise for what the network or
the endpoint does.

The address check happens on the connection itself: the connection resolves the host, drops
every address `refusal_reason` refuses and connects to one that is left. Checking a name
first and letting the HTTP library resolve it again would leave a window in which DNS can
answer differently (DNS rebinding). The hostname stays the request's Host header and, for
https, its SNI name and the name the certificate is verified against.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from http import HTTPStatus
from http.client import InvalidURL
from typing import Any
from urllib.parse import unquote

import certifi
import urllib3.exceptions
from urllib3 import BaseHTTPResponse, HTTPHeaderDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import Url, make_headers, parse_url
from urllib3.util.connection import allowed_gai_family

from promptq.tls import verifying_context
from promptq.upstream.classify import parse_retry_after
from promptq.webhooks.deadlines import Deadline
from promptq.webhooks.ssrf import (
    NO_ALLOW,
    UnsafeTarget,
    WebhookAllow,
    check_url,
    refusal_hint,
    refusal_reason,
)

DEFAULT_TIMEOUT_SECONDS = 15.0
EXCERPT_BYTES = 1024

_AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


@dataclass(frozen=True)
class DeliveryResult:
    status_code: int | None  # None: no HTTP answer at all
    latency_ms: int
    response_excerpt: str | None  # the first EXCERPT_BYTES of the body, when there was one
    error: str | None  # why the delivery failed, for the person reading the attempt log
    retry_after: float | None  # seconds, from Retry-After on a 429 or 503

    @property
    def succeeded(self) -> bool:
        return self.error is None and self.status_code is not None and 200 <= self.status_code < 300


def _sort_addresses(
    infos: Sequence[_AddrInfo],
    allow_private: bool,
    allow: WebhookAllow = NO_ALLOW,
    host: str | None = None,
) -> tuple[list[_AddrInfo], list[str]]:
    """getaddrinfo's answers split into those we may connect to and, described, the refused."""
    allowed: list[_AddrInfo] = []
    refused: list[str] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        reason = refusal_reason(ip, allow_private, allow, host)
        if reason is None:
            allowed.append(info)
        elif (described := f"{ip} is {reason}") not in refused:
            refused.append(described)
    return allowed, refused


def _address_literal(host: str, port: int) -> list[_AddrInfo] | None:
    """What getaddrinfo answers for a host that is an address in its usual spelling (a
    dotted quad, or IPv6 without a zone), without asking it; None for anything else. In a
    worker, getaddrinfo is gevent's, a trip to a native thread, and back only once that
    thread has had the GIL: in a busy worker 6 to 17 ms of a POST to a local receiver
    (bench/webhook_delay.py), for an answer known beforehand. The other spellings
    resolvers take (127.1, 0x7f000001) still go to getaddrinfo."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return None  # a zone is the resolver's to read
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]


@dataclass(frozen=True)
class _ConnectPolicy:
    allow_private: bool
    deadline: Deadline
    allow: WebhookAllow = NO_ALLOW

    def connect(self, conn: HTTPConnection) -> socket.socket:
        """What urllib3's own `_new_conn` does, with the address check between resolving and
        connecting."""
        # `_dns_host` keeps a trailing dot, which matters to the resolver (no search domains).
        host = conn._dns_host.strip("[]")
        infos: Sequence[_AddrInfo] | None = _address_literal(host, conn.port)
        if infos is None:
            try:
                infos = list(
                    socket.getaddrinfo(host, conn.port, allowed_gai_family(), socket.SOCK_STREAM)
                )
            except socket.gaierror as error:
                raise NameResolutionError(conn.host, conn, error) from error
        allowed, refused = _sort_addresses(infos, self.allow_private, self.allow, conn.host)
        if not allowed:
            raise UnsafeTarget(
                f"refused to connect to {conn.host}: {', '.join(refused)}; "
                f"{refusal_hint(self.allow_private)}"
            )
        last_error: OSError | None = None
        for family, kind, proto, _, sockaddr in allowed:
            remaining = self.deadline.remaining()
            if remaining <= 0:
                break
            limit = conn.timeout if isinstance(conn.timeout, int | float) else None
            sock = socket.socket(family, kind, proto)
            try:
                for option in conn.socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(remaining if limit is None else min(limit, remaining))
                sock.connect(sockaddr)
            except OSError as error:
                sock.close()
                last_error = error
                continue
            self.deadline.watch(sock)
            return sock
        if last_error is None or isinstance(last_error, TimeoutError):
            raise ConnectTimeoutError(conn, f"connecting to {conn.host} timed out")
        raise NewConnectionError(conn, f"failed to connect: {last_error}") from last_error


class _GuardedHTTPConnection(HTTPConnection):
    def __init__(self, *args: Any, policy: _ConnectPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._policy = policy

    def _new_conn(self) -> socket.socket:
        return self._policy.connect(self)


class _GuardedHTTPSConnection(HTTPSConnection):
    # `connect` wraps the socket from `_new_conn` in TLS for `self.host`, the name: SNI and
    # certificate verification are untouched by connecting to a checked address.
    def __init__(self, *args: Any, policy: _ConnectPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._policy = policy

    def _new_conn(self) -> socket.socket:
        return self._policy.connect(self)


def _innermost(error: BaseException) -> BaseException:
    """The exception at the bottom of urllib3's wrappers: the one that says why."""
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        reason = getattr(error, "reason", None)
        inner = [a for a in error.args if isinstance(a, BaseException)]
        following: BaseException | None
        if isinstance(reason, BaseException):
            following = reason
        elif inner:
            following = inner[-1]
        else:
            following = error.__cause__
        if following is None:
            break
        error = following
    return error


def _without_secrets(url: str) -> str:
    """A URL to show: no credentials, no query, at most 200 characters."""
    try:
        parsed = parse_url(url)
    except urllib3.exceptions.LocationParseError:
        return "an unreadable URL"
    shown = parsed._replace(auth=None, query=None, fragment=None).url
    return shown if len(shown) <= 200 else shown[:199] + "…"


class WebhookSender:
    """Posts webhooks. Safe to share between threads: every post has its own connection, which
    is also the only sane choice when each job names its own endpoint.

    On urllib3's connections directly, not requests: one POST on a connection of its own
    needs none of requests' sessions, adapters and pools, which cost a POST to a local
    receiver 0.62 ms of CPU against 0.41 without them and 0.30 on a bare urllib3 connection
    (bench/webhook_post.py), paid in a worker on the core its jobs share. Over HTTPS the CA
    bundle is loaded once per sender (promptq.tls): loaded for every POST, it made a POST
    cost 22 ms of CPU against 2.1."""

    def __init__(
        self,
        allow_private: bool = False,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        allow: WebhookAllow = NO_ALLOW,
        excerpt_bytes: int = EXCERPT_BYTES,
        ca_bundle: str | None = None,
    ) -> None:
        self.allow_private = allow_private  # PROMPTQ_WEBHOOK_ALLOW_PRIVATE
        self.allow = allow  # PROMPTQ_WEBHOOK_ALLOW
        self.timeout = timeout
        self.excerpt_bytes = excerpt_bytes
        # A private CA's bundle, else certifi's.
        self._tls = verifying_context(ca_bundle or certifi.where())
        self._headers = {
            "user-agent": "promptq-webhooks",
            "content-type": "application/json",
            # The raw body is what the excerpt shows; and a small gzip bomb stays small.
            "accept-encoding": "identity",
            "accept": "*/*",  # what requests sent: receivers see the headers they saw before
        }

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> DeliveryResult:
        started = time.monotonic()
        deadline = Deadline(self.timeout)
        connection: HTTPConnection | None = None
        try:
            # The form of the URL only: its address is checked on the connection.
            check_url(url, allow_private=True)
            target = parse_url(url)
            connection = self._connection(target, deadline)
            connection.request(
                "POST",
                target.request_uri,
                body=body,
                headers=self._request_headers(target, headers),
                preload_content=False,
                decode_content=False,
            )
            response = connection.getresponse()
            try:
                if deadline.expired:
                    # Cut off mid-headers, http.client takes the end of the stream for their
                    # end: an answer that was not complete in time is no answer.
                    return self._failed(self._describe(TimeoutError(), url, deadline), started)
                excerpt = self._read_excerpt(response, deadline)
            finally:
                response.close()
            return self._answered(response, excerpt, started)
        except UnsafeTarget as error:
            return self._failed(str(error), started)
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
            return self._failed(self._describe(error, url, deadline), started)
        finally:
            deadline.close()
            if connection is not None:
                connection.close()

    def _connection(self, target: Url, deadline: Deadline) -> HTTPConnection:
        """A connection to the URL's host, not yet open: it opens on the request, through the
        address check, within what is left of the deadline."""
        policy = _ConnectPolicy(self.allow_private, deadline, self.allow)
        host = (target.host or "").strip("[]")  # an IPv6 literal, as urllib3's pools pass it
        remaining = deadline.remaining()
        if target.scheme == "https":
            return _GuardedHTTPSConnection(
                host,
                target.port or 443,
                timeout=remaining,
                policy=policy,
                ssl_context=self._tls,
            )
        return _GuardedHTTPConnection(host, target.port or 80, timeout=remaining, policy=policy)

    def _request_headers(self, target: Url, headers: Mapping[str, str]) -> HTTPHeaderDict:
        merged = HTTPHeaderDict(self._headers)
        if target.auth:
            # As requests sends them: Basic auth, each part percent-decoded.
            user, _, password = target.auth.partition(":")
            merged.update(make_headers(basic_auth=f"{unquote(user)}:{unquote(password)}"))
        for name, value in headers.items():
            merged[name] = value  # replaces ours of the same name, whatever its case
        return merged

    def _read_excerpt(self, response: BaseHTTPResponse, deadline: Deadline) -> bytes:
        """Up to `excerpt_bytes` of the body, or what arrived of it before the deadline."""
        chunks: list[bytes] = []
        size = 0
        with suppress(urllib3.exceptions.HTTPError, OSError):
            while size < self.excerpt_bytes and not deadline.expired:
                # read1: whatever has arrived, so a slow body keeps what it sent so far.
                chunk = response.read1(self.excerpt_bytes - size, decode_content=False)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        return b"".join(chunks)

    def _answered(
        self, response: BaseHTTPResponse, excerpt: bytes, started: float
    ) -> DeliveryResult:
        status = response.status
        error: str | None = None
        if 300 <= status < 400:
            location = response.headers.get("location")
            target = f" to {_without_secrets(location)}" if location else ""
            error = (
                f"the endpoint answered {status} (a redirect{target}); "
                "promptq does not follow redirects"
            )
        elif not 200 <= status < 300:
            with suppress(ValueError):
                error = f"the endpoint answered {status} {HTTPStatus(status).phrase}"
            error = error or f"the endpoint answered {status}"
        return DeliveryResult(
            status_code=status,
            latency_ms=_elapsed_ms(started),
            response_excerpt=excerpt.decode("utf-8", "replace"),
            error=error,
            retry_after=parse_retry_after(response.headers) if status in (429, 503) else None,
        )

    def _describe(self, error: BaseException, url: str, deadline: Deadline) -> str:
        # Host and port only: the path and query of a webhook URL can carry its secrets.
        try:
            parsed = parse_url(url)
            where = f"{parsed.host}:{parsed.port}" if parsed.port else str(parsed.host)
        except urllib3.exceptions.LocationParseError:
            where = "the endpoint"
        # urllib3 makes every failure to connect a ConnectTimeoutError; a refusal is not one.
        refused = isinstance(error, NewConnectionError)
        if isinstance(error, ConnectTimeoutError) and not refused:
            return f"connecting to {where} took longer than {self.timeout:g}s"
        timed_out = isinstance(error, TimeoutError | urllib3.exceptions.TimeoutError)
        if deadline.expired or (timed_out and not refused):
            return f"{where} did not answer within {self.timeout:g}s"
        if isinstance(error, urllib3.exceptions.LocationParseError | InvalidURL | UnicodeError):
            # UnicodeError: a host name that IDNA cannot encode.
            return "webhook_url is not a URL promptq can post to"
        cause = _innermost(error)
        if isinstance(error, ssl.SSLError | ssl.CertificateError | urllib3.exceptions.SSLError):
            return f"TLS with {where} failed: {cause}"
        return f"connecting to {where} failed: {cause}"

    def _failed(self, error: str, started: float) -> DeliveryResult:
        return DeliveryResult(
            status_code=None,
            latency_ms=_elapsed_ms(started),
            response_excerpt=None,
            error=error,
            retry_after=None,
        )


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
