"""One typed settings object for every process (API, worker, beat, CLI).

Read from `PROMPTQ_*` environment variables and a `.env` file in the working directory.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from promptq.redis_roles import RedisRole, check_url
from promptq.webhook_allow import IPNetwork, WebhookAllow

DEFAULT_UPSTREAM_URL = "https://api.cometapi.com"
# The fewest standby jobs a worker keeps when PROMPTQ_WORKER_STANDBY_JOBS is unset.
MIN_STANDBY_JOBS = 8


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PROMPTQ_",
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
        # `PROMPTQ_LIMITS_FILE=` in a .env file means "unset", not the current directory;
        # an empty upstream key must not hide COMETAPI_KEY.
        env_ignore_empty=True,
    )

    database_url: str = "sqlite:///./promptq.db"
    # Connections per process (PostgreSQL): at most pool + overflow, each opened when first
    # wanted and then kept (promptq.db). A worker's greenlets hold one only for the short
    # statements around a call, so a few serve hundreds; keep processes x (pool + overflow)
    # under the server's max_connections. The pool size is also how many threads the API
    # takes jobs in on (api.intake).
    database_pool_size: int = Field(default=5, ge=1)
    database_max_overflow: int = Field(default=15, ge=0)
    # What stands between promptq and PostgreSQL: `pgbouncer` (transaction pooling) turns
    # psycopg's prepared statements off, since the next transaction may run on another
    # server connection that never saw them. Said, not guessed from the URL: a pooler
    # answers as the server it fronts, on any port.
    database_pooler: Literal["none", "pgbouncer"] = "none"
    # How long a PostgreSQL connection may go unanswered (a statement sent and not
    # acknowledged, keepalives not answered) before it is dropped and another tried; and
    # connecting gives up after at most 10 s. Without them a network partition (packets
    # dropped, nothing refused) holds a statement or a connect for the kernel's TCP
    # retries, minutes, and for up to two minutes past the network's return (promptq.db).
    database_network_timeout_seconds: float = Field(default=30.0, ge=2)
    # Unset means "no shared Redis": `promptq up` then starts a private one and passes its
    # URL to the processes it runs. Every other process needs it set.
    redis_url: str | None = None
    # Redis by role (promptq.redis_roles says what each holds), each PROMPTQ_REDIS_URL
    # unless set: Celery's broker, its events and the publish markers; the rate limiter's
    # and quotas' keys; the pub/sub of finished jobs and changed keys. Any of the four may
    # be a Sentinel group: sentinel://host:26379,host2:26379/mymaster/0.
    broker_url: str | None = None
    limiter_redis_url: str | None = None
    events_redis_url: str | None = None
    upstream_url: str = DEFAULT_UPSTREAM_URL
    upstream_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("PROMPTQ_UPSTREAM_API_KEY", "COMETAPI_KEY"),
    )
    admin_token: SecretStr | None = None
    limits_file: Path | None = None
    pricing_file: Path | None = None
    webhook_allow_private: bool = False
    # Host names, addresses and CIDR networks webhooks may reach beside public addresses,
    # separated by commas: one internal receiver without opening every private address.
    webhook_allow: str = ""
    flower_basic_auth: SecretStr | None = None
    # Addresses and CIDR networks of the reverse proxies in front of the API, comma-separated:
    # their X-Forwarded-Proto and X-Forwarded-For are believed (the dashboard's cookie and
    # its sign-in limit). Nothing by default.
    trusted_proxies: str = ""
    # Failed dashboard sign-ins allowed per client address in a window, then a 429 until it ends.
    dashboard_max_failed_sign_ins: int = Field(default=10, ge=1)
    dashboard_sign_in_window_seconds: int = Field(default=900, ge=1)
    # Unset: /metrics answers anyone who can reach it. Set: a scrape sends it as a bearer token.
    metrics_token: SecretStr | None = None

    # Intake
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Templates (POST /v1/templates): a template's source, the time one render may take
    # (it runs in a child process that is killed then) and the prompt it may make.
    template_max_source_bytes: int = Field(default=100_000, ge=1024)
    template_max_ms: int = Field(default=1000, ge=10)
    template_max_bytes: int = Field(default=1024 * 1024, ge=1024)
    # A Message Batch create may be larger, though not Anthropic's 256 MB: parsing and
    # storing a batch takes about 12 MiB of API memory per MB of batch (README, Security),
    # and deploy/'s API pod has 512 MiB. Split larger batches, or raise the limit and the
    # memory together.
    max_batch_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # How long POST /v1/messages waits for its job to start before giving up with a 529
    # (the SDK then retries); a job already running is always waited for.
    messages_wait_seconds: float = Field(default=600.0, gt=0)
    default_max_tokens: int = Field(default=1024, ge=1)
    # The model a flat `prompt` job runs on when it names none (not claude-sonnet-4-5,
    # which Anthropic retires on 2026-11-30).
    default_model: str = "claude-sonnet-4-6"

    # Upstream calls and retries
    upstream_timeout_seconds: float = Field(default=600.0, gt=0)
    upstream_connect_timeout_seconds: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=6, ge=1, le=100)
    retry_base_seconds: float = Field(default=1.0, ge=0)
    retry_max_seconds: float = Field(default=60.0, ge=0)

    # Worker
    # Upstream calls one worker process keeps waiting at once, each in a greenlet (the
    # account's own limits, in the limits file, decide how many really go).
    worker_concurrency: int = Field(default=1000, ge=1, le=10_000)
    # Jobs a worker process takes from the broker beyond its concurrency, each waiting in a
    # greenlet of its own for a call in flight to end, so that the next call starts at once
    # (promptq.jobs.call_slots). Unset: half the concurrency, at least 8: calls that end
    # together (answers of one length, started in one burst) are replaced at once, where
    # Celery's consumer, one message per turn among a thousand busy greenlets, would refill
    # them over seconds (README, "Sizing workers"). They are the broker's next messages held
    # early: another worker with room does not get them; a job published later at a higher
    # priority goes before them once this worker takes it (promptq.jobs.call_slots).
    worker_standby_jobs: int | None = Field(default=None, ge=0, le=10_000)
    # Records one worker process writes at once, its jobs' answers and its webhook
    # deliveries' attempts; the others wait their turn, about in the order they came
    # (JobRunner.record_turns, worker.delivery_sending).
    worker_records_at_once: int = Field(default=2, ge=1, le=10_000)
    # A message not acknowledged within this many seconds is handed to another worker by
    # the Redis broker; every countdown we use must stay well below it.
    broker_visibility_timeout_seconds: int = Field(default=3600, ge=60)
    # How long a claimed job stays ours without a heartbeat before the sweeper takes it back.
    claim_lease_seconds: int = Field(default=30, ge=5)
    # How long a rate-limit concurrency slot outlives a worker that stopped renewing it.
    slot_lease_seconds: int = Field(default=30, ge=3)
    sweep_interval_seconds: float = Field(default=10.0, gt=0)
    # The longest one sweeper pass walks the stale jobs; the next pass goes on from there.
    sweep_budget_seconds: float = Field(default=5.0, gt=0)
    # A queued job older than this with no progress is published again by the sweeper.
    republish_after_seconds: int = Field(default=30, ge=1)
    # Per-key quotas (the README's Security section): what one client key may make or hold,
    # so that no key can harm the others. Far above what one tenant needs in ordinary use.
    key_max_unfinished_jobs: int = Field(default=200_000, ge=1)
    key_max_subscriptions: int = Field(default=25, ge=1)
    key_max_templates: int = Field(default=100, ge=1)
    key_max_requests_per_second: float = Field(default=100.0, gt=0)
    key_max_redeliveries_per_minute: int = Field(default=10, ge=1)
    # Requests held open on a job (?wait, /v1/messages) per API process: one key's, all.
    key_max_open_requests: int = Field(default=50, ge=1)
    max_open_requests: int = Field(default=1000, ge=1)
    # Jobs one client key may have waiting at high priority for a model's rate; its next
    # ones wait as normal, so that no key starves the others by sending everything "high".
    key_max_high_priority_waiting: int = Field(default=5, ge=1, le=100_000)
    # Webhook deliveries have threads of their own in each worker process, apart from the
    # jobs' threads, and one key's deliveries may hold only a few of them: a key whose
    # receivers never answer waits on its own share, never on anyone's jobs or webhooks.
    webhook_concurrency: int = Field(default=16, ge=1, le=1000)
    webhook_max_in_flight_per_key: int = Field(default=4, ge=1, le=1000)

    # The address clients and webhook receivers reach promptq at (https://promptq.example.com,
    # behind a reverse proxy): every URL promptq hands out is built on it, in webhooks, where
    # there is no request to take an address from, and in answers, where the address the
    # API saw may be a proxy's internal one. Unset: answers use the address the client
    # called and webhooks fall back to api_url.
    public_url: str | None = None

    # Retention: finished jobs are deleted this many days after they ended (0: never).
    # Money and figures stay in the spend ledger and the hourly rollups forever.
    retention_days: int = Field(default=30, ge=0, le=36500)
    # How long one run of the beat's prune may last; the next run goes on.
    prune_budget_seconds: float = Field(default=60.0, gt=0)

    # /metrics: how many distinct model names get a label of their own (the first seen);
    # the rest are summed under `other`, so clients cannot grow the label set without end.
    metrics_max_models: int = Field(default=50, ge=1, le=10000)

    # Client side (`promptq submit`, `promptq jobs ls`)
    api_url: str = "http://127.0.0.1:8000"
    api_key: SecretStr | None = None

    # Logs of `promptq api`, `worker` and `beat`: one JSON object per line for a log pipeline
    # (the default, since these run as services), or `text` for a person at a terminal.
    log_format: Literal["json", "text"] = "json"
    # The least severe level those processes log (a Python level name).
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("upstream_url", "api_url", "public_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("redis_url", "broker_url", "limiter_redis_url", "events_redis_url")
    @classmethod
    def _redis_url_parses(cls, value: str | None) -> str | None:
        if value is not None:
            check_url(value)  # a ValueError says what is wrong
        return value

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: ValidationInfo) -> object:
        # `PROMPTQ_LOG_LEVEL=debug` and `PROMPTQ_LOG_FORMAT=JSON` mean what they say.
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "log_level" else value.lower()

    @field_validator("webhook_allow")
    @classmethod
    def _webhook_allow_parses(cls, value: str) -> str:
        WebhookAllow.parse(value)  # a ValueError names the entry
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_parse(cls, value: str) -> str:
        _networks(value)  # a ValueError names the entry
        return value

    @property
    def trusted_proxy_networks(self) -> tuple[IPNetwork, ...]:
        return _networks(self.trusted_proxies)

    @property
    def webhook_allow_list(self) -> WebhookAllow:
        return WebhookAllow.parse(self.webhook_allow)

    @property
    def upstream_key(self) -> str | None:
        return self.upstream_api_key.get_secret_value() if self.upstream_api_key else None

    @property
    def webhook_base_url(self) -> str:
        """Where URLs inside webhooks point: there is no request to take an address from."""
        return self.public_url or self.api_url

    def redis_url_for(self, role: RedisRole) -> str | None:
        """The Redis serving `role` ("broker", "limiter" or "events"): its own setting, else
        PROMPTQ_REDIS_URL; None when neither is set. Read at each call, so a copy of the
        settings with another redis_url moves every role that has no URL of its own."""
        own = {
            "broker": self.broker_url,
            "limiter": self.limiter_redis_url,
            "events": self.events_redis_url,
        }[role]
        return own or self.redis_url

    def redis_urls(self) -> dict[RedisRole, str | None]:
        return {role: self.redis_url_for(role) for role in get_args(RedisRole)}

    @property
    def worker_greenlets(self) -> int:
        """Tasks a worker process runs at once: its calls in flight and its standby jobs."""
        standby = self.worker_standby_jobs
        if standby is None:
            standby = max(MIN_STANDBY_JOBS, self.worker_concurrency // 2)
        return self.worker_concurrency + standby

    @property
    def uses_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def missing_upstream_key(self) -> str | None:
        """Why a worker or an API with these settings would only ever get 401s from the
        upstream, or None. Without a key the upstream refuses every call, so every job would
        fail; only an upstream on this machine (the simulator, a local proxy that adds the
        key itself) may be reached without one."""
        if self.upstream_key is not None or is_loopback_url(self.upstream_url):
            return None
        return (
            f"no upstream key is set, so every call to {self.upstream_url}/v1/messages would "
            "be refused (401): set PROMPTQ_UPSTREAM_API_KEY (or COMETAPI_KEY) to the key of "
            "that upstream, or point PROMPTQ_UPSTREAM_URL at a simulator on this machine "
            "(`promptq simulate-upstream`)"
        )


def is_loopback_url(url: str) -> bool:
    """Whether the URL's host is this machine: localhost, or a loopback address."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _networks(text: str) -> tuple[IPNetwork, ...]:
    networks = []
    for entry in text.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an address or a CIDR network") from None
    return tuple(networks)


# An admin token is a bearer credential for every key's data: as long as a generated one
# (`openssl rand -hex 16` makes 32 characters). A Flower password is typed, but `promptq up`
# makes 16 characters, and Flower can stop workers.
ADMIN_TOKEN_MIN_LENGTH = 32
FLOWER_PASSWORD_MIN_LENGTH = 16
# Words of the examples and placeholders a copied file may still hold.
_PLACEHOLDERS = ("replaceme", "changeme", "placeholder", "example", "yourtoken", "yourpassword")
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def _looks_like_placeholder(secret: str) -> bool:
    letters = "".join(c for c in secret.lower() if c.isalnum())
    return not letters or any(word in letters for word in _PLACEHOLDERS)


def admin_token_problem(settings: Settings) -> str | None:
    """Why `promptq api` must not start with this PROMPTQ_ADMIN_TOKEN, or None (unset is
    fine: the admin endpoints then answer no one)."""
    if settings.admin_token is None:
        return None
    token = settings.admin_token.get_secret_value()
    if _looks_like_placeholder(token):
        return "PROMPTQ_ADMIN_TOKEN is a placeholder; set a random one: openssl rand -hex 32"
    if len(token) < ADMIN_TOKEN_MIN_LENGTH:
        return (
            f"PROMPTQ_ADMIN_TOKEN has {len(token)} characters, fewer than "
            f"{ADMIN_TOKEN_MIN_LENGTH}; set a random one: openssl rand -hex 32"
        )
    return None


def flower_password_problem(credentials: str) -> str | None:
    """Why Flower must not start with this `user:password`, or None."""
    password = credentials.partition(":")[2]
    if _looks_like_placeholder(password):
        return (
            "PROMPTQ_FLOWER_BASIC_AUTH's password is a placeholder; set a random one, e.g. "
            "admin:$(openssl rand -hex 12)"
        )
    if len(password) < FLOWER_PASSWORD_MIN_LENGTH:
        return (
            f"PROMPTQ_FLOWER_BASIC_AUTH's password has {len(password)} characters, fewer than "
            f"{FLOWER_PASSWORD_MIN_LENGTH}; set a random one, e.g. admin:$(openssl rand -hex 12)"
        )
    return None


def upstream_warning(settings: Settings) -> str | None:
    """A warning when the upstream key would cross a network in clear text."""
    from urllib.parse import urlsplit

    parts = urlsplit(settings.upstream_url)
    host = (parts.hostname or "").lower()
    if parts.scheme != "http" or host in _LOOPBACK_HOSTS or host.startswith("127."):
        return None
    return (
        f"PROMPTQ_UPSTREAM_URL is plain http to {host}, which is not this machine: the "
        "upstream key and every prompt cross the network unencrypted; use https://"
    )


@lru_cache
def get_settings() -> Settings:
    return Settings()
