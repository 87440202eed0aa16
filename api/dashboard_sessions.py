"""The dashboard's sign-in sessions, in Redis: the cookie holds a random session id, never the
credential, and signing out deletes the session, so a copied cookie stops working too.

Redis holds a hash of each session id (a copy of Redis gives no usable cookie) and, for a key,
only its id: the key is looked up again on each page, so a revoked key's sessions end with it.
An admin session holds a fingerprint of the admin token, so changing PROMPTQ_ADMIN_TOKEN ends
every admin session. Failed sign-ins are counted per client address in a fixed window.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
from dataclasses import dataclass

from starlette.requests import Request

from promptq.config import Settings
from promptq.redis_roles import redis_client

SESSION_PREFIX = "promptq:dashboard:session:"
FAILED_PREFIX = "promptq:dashboard:failed-sign-ins:"
# Redis must answer a page view quickly or not at all (then the usual 503).
REDIS_TIMEOUT_SECONDS = 2.0
_FORWARDING_HEADERS = ("x-forwarded-proto", "x-forwarded-for", "forwarded")


@dataclass(frozen=True)
class Who:
    """Whom a session is for: a key's id, or the admin (key_id None)."""

    key_id: str | None


def admin_fingerprint(settings: Settings) -> str | None:
    if settings.admin_token is None:
        return None
    token = settings.admin_token.get_secret_value().encode()
    return hmac.new(token, b"promptq dashboard session", hashlib.sha256).hexdigest()


class DashboardSessions:
    def __init__(self, redis_url: str, settings: Settings) -> None:
        self.redis = redis_client(
            redis_url,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        )
        self.settings = settings

    def start(self, who: Who, seconds: int) -> str:
        """A new session for `who`; its id, for the cookie."""
        session_id = secrets.token_urlsafe(32)
        record = {"key_id": who.key_id, "admin": admin_fingerprint(self.settings)}
        if who.key_id is not None:
            record.pop("admin")
        self.redis.set(_stored(session_id), json.dumps(record), ex=seconds)
        return session_id

    def find(self, session_id: str) -> Who | None:
        """Whom a live session is for; None for an unknown, ended or stale one."""
        if not session_id or len(session_id) > 100:
            return None
        raw = self.redis.get(_stored(session_id))
        if raw is None:
            return None
        record = json.loads(raw)
        if record.get("key_id") is not None:
            return Who(str(record["key_id"]))
        current = admin_fingerprint(self.settings)
        if current is None or not hmac.compare_digest(str(record.get("admin")), current):
            return None  # the admin token changed or was removed since
        return Who(None)

    def end(self, session_id: str) -> None:
        if session_id and len(session_id) <= 100:
            self.redis.delete(_stored(session_id))

    def blocked_for(self, address: str) -> int | None:
        """Seconds until `address` may try to sign in again, or None if it may now."""
        failures = self.redis.get(FAILED_PREFIX + address)
        if failures is None or int(failures) < self.settings.dashboard_max_failed_sign_ins:
            return None
        return max(1, int(self.redis.ttl(FAILED_PREFIX + address)))

    def failed(self, address: str) -> None:
        key = FAILED_PREFIX + address
        with self.redis.pipeline() as pipe:
            # The window starts at the first failure and is not stretched by later ones
            # (INCR keeps the TTL; SET NX rather than EXPIRE NX, which needs Redis 7).
            pipe.set(key, 0, ex=self.settings.dashboard_sign_in_window_seconds, nx=True)
            pipe.incr(key)
            pipe.execute()


def _stored(session_id: str) -> str:
    return SESSION_PREFIX + hashlib.sha256(session_id.encode()).hexdigest()


def _trusted(settings: Settings, address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in settings.trusted_proxy_networks)


def client_address(request: Request, settings: Settings) -> str:
    """The browser's address: the connection's, or what a configured proxy says it is."""
    peer = request.client.host if request.client else ""
    forwarded_for = request.headers.get("x-forwarded-for")
    if forwarded_for and _trusted(settings, peer):
        # The last hop is the one our proxy added; earlier ones are the client's to forge.
        return forwarded_for.split(",")[-1].strip()
    return peer


def _loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cookie_secure(request: Request, settings: Settings) -> bool:
    """`Secure` unless the browser came over plain http to this machine's loopback (where
    no TLS is expected, and some browsers would drop a Secure cookie). X-Forwarded-Proto is
    believed from PROMPTQ_TRUSTED_PROXIES only; any other proxied request is taken to have
    TLS in front, the safe side."""
    peer = request.client.host if request.client else ""
    scheme = request.url.scheme
    if _trusted(settings, peer) and "x-forwarded-proto" in request.headers:
        scheme = request.headers["x-forwarded-proto"].split(",")[0].strip().lower()
        peer = client_address(request, settings)
    elif any(name in request.headers for name in _FORWARDING_HEADERS):
        return True
    if scheme != "http":
        return True
    return not (_loopback(request.url.hostname) and _loopback(peer))


def cross_site_problem(request: Request) -> str | None:
    """Why a sign-in or sign-out form post looks like it came from another site, or None.
    Browsers send Sec-Fetch-Site (and Origin on a POST); a client that sends neither is not
    a browser, and a cookie cannot be forged across sites without one."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        # Authoritative where a browser sends it; its Origin may then be "null" anyway
        # (a page whose referrer policy is no-referrer).
        return None if site in ("same-origin", "none") else f"Sec-Fetch-Site is {site}"
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "")
        if origin == "null" or origin.split("://", 1)[-1].rstrip("/") != host:
            return "the Origin is another site"
    return None
