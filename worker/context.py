"""What a worker process builds once and shares between its threads."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import redis

from promptq.broker.messenger import BrokerMessenger
from promptq.config import Settings, get_settings
from promptq.jobs.leases import LeaseKeeper
from promptq.jobs.runner import JobRunner
from promptq.pricing import PriceTable
from promptq.ratelimit.limiter import RedisLimiter
from promptq.ratelimit.table import LimitTable
from promptq.upstream import UpstreamClient
from promptq.webhooks import WebhookSender
from worker.deliveries import DeliveryPool


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    # Sends what the process's units of work record (promptq.outbox): the runner's, the
    # sweeper's. Built once here, with the process's Celery app and Redis client.
    messenger: BrokerMessenger
    limiter: RedisLimiter
    leases: LeaseKeeper
    runner: JobRunner
    webhooks: WebhookSender
    deliveries: DeliveryPool


@lru_cache(maxsize=1)
def worker_context() -> WorkerContext:
    from worker.app import app

    settings = get_settings()
    assert settings.redis_url is not None  # create_celery refused to start without it
    client = redis.Redis.from_url(settings.redis_url)
    limiter = RedisLimiter(
        client,
        LimitTable.load(settings.limits_file),
        slot_lease_seconds=settings.slot_lease_seconds,
        high_waiting_per_key=settings.key_max_high_priority_waiting,
    )
    leases = LeaseKeeper(settings, limiter)
    upstream = UpstreamClient(
        settings.upstream_url,
        settings.upstream_key,
        timeout=settings.upstream_timeout_seconds,
        connect_timeout=settings.upstream_connect_timeout_seconds,
    )

    messenger = BrokerMessenger(app, client)
    runner = JobRunner(
        settings, PriceTable.load(settings.pricing_file), upstream, limiter, leases, messenger
    )
    return WorkerContext(
        settings=settings,
        messenger=messenger,
        limiter=limiter,
        leases=leases,
        runner=runner,
        webhooks=WebhookSender(
            allow_private=settings.webhook_allow_private, allow=settings.webhook_allow_list
        ),
        deliveries=DeliveryPool(
            settings.webhook_concurrency, settings.webhook_max_in_flight_per_key
        ),
    )
