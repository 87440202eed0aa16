"""Which Redis serves each of promptq's roles, and how a process reaches it.

Three roles, each with a setting of its own that defaults to PROMPTQ_REDIS_URL, so that a
deployment can give each its own server (or Sentinel group) as it grows:

- broker (PROMPTQ_BROKER_URL): Celery's queues and unacknowledged messages; Celery's task
  events and control messages, which travel over the broker connection (Celery has no
  transport of their own for them, and Flower reads them there); and the publish markers
  (`promptq:published:*`), which say whether a job's message is still in the broker, so
  they must live and die with the broker's data: a wiped broker takes its markers along
  and the sweeper publishes the lost jobs again.
- limiter (PROMPTQ_LIMITER_REDIS_URL): every key promptq keeps for itself: the rate
  limiter's meters, slots, 429 pauses and queues (with the fair queue across keys), the
  per-key quotas, the sweeper's cursor and lock, and the dashboard's sessions.
- events (PROMPTQ_EVENTS_REDIS_URL): pub/sub only, no keys: word of finished jobs (to
  requests held open on them) and of changed keys (to every API process's key cache).

A URL is a plain one (`redis://`, `rediss://`, `unix://`, as redis-py reads them), or a
Sentinel group, for failover:

    sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db][?sentinel_password=...]

The hosts are the sentinels (port 26379 unless given); `service` is the name they monitor
(`mymaster`); the user and password are those of the Redis servers, `sentinel_password`
that of the sentinels themselves, when they ask for one. Every client asks the sentinels
for the current primary and asks again after a failover.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.driver_info import DriverInfo

# Core: this module imports nothing of promptq, so that the settings can check a URL with
# it when a process starts (promptq.config), as they do PROMPTQ_WEBHOOK_ALLOW.

# The parts of promptq that may each have a Redis of their own.
RedisRole = Literal["broker", "limiter", "events"]
ROLE_SETTINGS: dict[RedisRole, str] = {
    "broker": "PROMPTQ_BROKER_URL",
    "limiter": "PROMPTQ_LIMITER_REDIS_URL",
    "events": "PROMPTQ_EVENTS_REDIS_URL",
}
SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379
# Asking a sentinel which server is the primary must not hang on one that is unreachable:
# the next sentinel is asked instead.
SENTINEL_TIMEOUT_SECONDS = 2.0


class RedisNotConfigured(RuntimeError):
    pass


class RoleUrls(Protocol):
    """What knows each role's URL: promptq.config.Settings."""

    def redis_url_for(self, role: RedisRole) -> str | None: ...


@dataclass(frozen=True)
class SentinelGroup:
    """A parsed `sentinel://` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> SentinelGroup:
        parts = urlsplit(url)
        if parts.scheme != SENTINEL_SCHEME:
            raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
        credentials, _, hosts = parts.netloc.rpartition("@")
        username, _, password = credentials.partition(":")
        sentinels = tuple(_host_and_port(entry) for entry in hosts.split(",") if entry.strip())
        if not sentinels:
            raise ValueError("a sentinel:// URL names at least one sentinel host")
        path = [segment for segment in parts.path.split("/") if segment]
        if not path or len(path) > 2:
            raise ValueError(
                "a sentinel:// URL ends in /SERVICE or /SERVICE/DB "
                "(sentinel://host:26379,host2:26379/mymaster/0)"
            )
        try:
            db = int(path[1]) if len(path) == 2 else 0
        except ValueError:
            raise ValueError(f"the database number {path[1]!r} is not a number") from None
        query = parse_qs(parts.query)
        unknown = set(query) - {"sentinel_password"}
        if unknown:
            names = ", ".join(sorted(unknown))
            raise ValueError(f"unknown option(s) in a sentinel:// URL: {names}")
        sentinel_password = query.get("sentinel_password", [None])[-1]
        return cls(
            sentinels=sentinels,
            service=unquote(path[0]),
            db=db,
            username=unquote(username) or None,
            password=unquote(password) or None,
            sentinel_password=sentinel_password or None,
        )

    def connection_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Options of a connection to the primary: the caller's, the database and login."""
        return {
            **options,
            "db": self.db,
            **({"username": self.username} if self.username else {}),
            **({"password": self.password} if self.password else {}),
        }

    def sentinel_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Options of a connection to a sentinel: the caller's timeouts (or ours), and the
        sentinels' own password."""
        chosen = {k: v for k, v in options.items() if k.startswith("socket_")}
        chosen.setdefault("socket_timeout", SENTINEL_TIMEOUT_SECONDS)
        chosen.setdefault("socket_connect_timeout", SENTINEL_TIMEOUT_SECONDS)
        if self.sentinel_password:
            chosen["password"] = self.sentinel_password
        return chosen

    def kombu_url(self) -> str:
        """The form kombu's Sentinel transport reads: one `sentinel://` URL per sentinel,
        separated by `;`, each with the servers' login and the database."""
        login = ""
        if self.username or self.password:
            login = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return ";".join(
            f"{SENTINEL_SCHEME}://{login}{_netloc(host, port)}/{self.db}"
            for host, port in self.sentinels
        )


def is_sentinel(url: str) -> bool:
    return urlsplit(url).scheme == SENTINEL_SCHEME


def check_url(url: str) -> None:
    """Raise ValueError, saying what is wrong, for a URL no client could use."""
    if is_sentinel(url):
        SentinelGroup.parse(url)
        return
    if urlsplit(url).scheme not in {"redis", "rediss", "unix"}:
        raise ValueError(
            f"must be a redis://, rediss://, unix:// or sentinel:// URL, got {mask(url)!r}"
        )


def role_url(settings: RoleUrls, role: RedisRole) -> str:
    """The URL of the Redis serving `role`, or RedisNotConfigured naming the settings."""
    url = settings.redis_url_for(role)
    if not url:
        raise RedisNotConfigured(
            f"neither {ROLE_SETTINGS[role]} nor PROMPTQ_REDIS_URL is set: point them at "
            "the shared Redis (e.g. redis://127.0.0.1:6379/0), or run `promptq up`, which "
            "starts a private one"
        )
    return url


# How redis-py names itself to the server (CLIENT SETINFO), given to every client and to
# kombu's (promptq.broker.transport). Left to itself, redis-py reads its own version from
# the installed package's metadata (importlib.metadata, a walk over sys.path) for every
# connection it opens: 0.3 ms of CPU each here, and more on a cold start, when a worker's
# first wave of jobs opens dozens of connections at once (py-spy: 7% of the worker's first
# second). The version is the same for the life of the process: read once.
DRIVER_INFO = DriverInfo(lib_version=redis.__version__)


def client_for(settings: RoleUrls, role: RedisRole, **options: Any) -> redis.Redis:
    """A client of the Redis serving `role` (options: redis-py's, e.g. socket_timeout)."""
    return redis_client(role_url(settings, role), **options)


def redis_client(url: str, **options: Any) -> redis.Redis:
    options.setdefault("driver_info", DRIVER_INFO)
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    group = SentinelGroup.parse(url)
    manager = _sentinel_manager(group, group.sentinel_options(options))
    return manager.master_for(group.service, **group.connection_options(options))


def async_redis_client(url: str, **options: Any) -> redis.asyncio.Redis:
    """An asyncio client; closing it (`aclose`) closes its sentinel connections too."""
    options.setdefault("driver_info", DRIVER_INFO)
    if not is_sentinel(url):
        return redis.asyncio.Redis.from_url(url, **options)
    group = SentinelGroup.parse(url)
    # Not shared between clients: asyncio connections belong to the event loop they were
    # made on, and a process may run several loops one after another (tests do).
    manager = redis.asyncio.sentinel.Sentinel(
        group.sentinels, sentinel_kwargs=group.sentinel_options(options)
    )
    client = manager.master_for(
        group.service, redis_class=_SentinelClient, **group.connection_options(options)
    )
    client.sentinel_manager = manager
    return client


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL for a role URL, and the transport options it needs besides."""
    if not is_sentinel(url):
        return url, {}
    group = SentinelGroup.parse(url)
    sentinel_kwargs = group.sentinel_options({})
    return group.kombu_url(), {"master_name": group.service, "sentinel_kwargs": sentinel_kwargs}


def passwords(url: str | None) -> list[str]:
    """Every password in a URL (the servers', the sentinels'), for the logs to mask."""
    if not url:
        return []
    if is_sentinel(url):
        try:
            group = SentinelGroup.parse(url)
        except ValueError:
            return []
        return [p for p in (group.password, group.sentinel_password) if p]
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    return [password] if password else []


def mask(url: str) -> str:
    """The URL with its passwords starred, for messages."""
    for password in passwords(url):
        url = url.replace(password, "***")
    return url


class _SentinelClient(redis.asyncio.Redis):
    sentinel_manager: redis.asyncio.sentinel.Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.aclose()


# One Sentinel manager (a connection to each sentinel) per group and options per process,
# shared by its clients: a process asks for clients of the same group many times (a
# readiness probe makes one per request).
_managers: dict[tuple[Any, ...], redis.sentinel.Sentinel] = {}
_managers_lock = threading.Lock()


def _sentinel_manager(group: SentinelGroup, options: dict[str, Any]) -> redis.sentinel.Sentinel:
    key = (group.sentinels, tuple(sorted(options.items())))
    with _managers_lock:
        manager = _managers.get(key)
        if manager is None:
            manager = _managers[key] = redis.sentinel.Sentinel(
                group.sentinels, sentinel_kwargs=options
            )
        return manager


def _host_and_port(entry: str) -> tuple[str, int]:
    entry = entry.strip()
    if entry.startswith("["):  # [::1]:26379
        host, _, rest = entry[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = entry.partition(":")
    if not host:
        raise ValueError(f"a sentinel host is missing in {entry!r}")
    try:
        port = int(port_text) if port_text else SENTINEL_PORT
    except ValueError:
        raise ValueError(f"the port of the sentinel {entry!r} is not a number") from None
    return host, port


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
