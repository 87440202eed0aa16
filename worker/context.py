"""What a worker process builds once and shares between its greenlets."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

from promptq.broker.messenger import BrokerMessenger
from promptq.config import Settings, get_settings
from promptq.jobs.call_slots import CallSlots
from promptq.jobs.leases import LeaseKeeper
from promptq.jobs.runner import JobRunner
from promptq.pricing import PriceTable
from promptq.ratelimit.limiter import RedisLimiter
from promptq.ratelimit.table import LimitTable
from promptq.redis_roles import client_for
from promptq.upstream import UpstreamClient
from promptq.webhooks import WebhookSender
from worker.deliveries import BrokerSource, DeliveryPool
from worker.delivery_sending import DeliverySender


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    # Sends what the process's units of work record (promptq.outbox): the runner's, the
    # sweeper's. Built once here, with the process's Celery app and its events Redis.
    messenger: BrokerMessenger
    limiter: RedisLimiter
    leases: LeaseKeeper
    runner: JobRunner
    webhooks: WebhookSender
    deliveries: DeliveryPool


@lru_cache(maxsize=1)
def worker_context() -> WorkerContext:
    from worker.app import get_app

    settings = get_settings()
    events = client_for(settings, "events")
    limiter = RedisLimiter(
        client_for(settings, "limiter"),
        LimitTable.load(settings.limits_file),
        slot_lease_seconds=settings.slot_lease_seconds,
        high_waiting_per_key=settings.key_max_high_priority_waiting,
    )
    leases = LeaseKeeper(settings, limiter)
    # After Redis lost the limiter's state, its in-flight slots come back from the database.
    limiter.running_calls = leases.running_calls
    upstream = UpstreamClient(
        settings.upstream_url,
        settings.upstream_key,
        timeout=settings.upstream_timeout_seconds,
        connect_timeout=settings.upstream_connect_timeout_seconds,
        max_connections=settings.worker_concurrency,
    )

    webhooks = WebhookSender(
        allow_private=settings.webhook_allow_private, allow=settings.webhook_allow_list
    )
    messenger = BrokerMessenger(get_app(), events)
    # The turns of the process's records, its jobs' and its deliveries' (JobRunner's and
    # DeliverySender's). Patched to gevent's, as it is made once the worker runs: waiting
    # yields.
    record_turns = threading.BoundedSemaphore(settings.worker_records_at_once)
    # Started by the worker process once ready (worker.lifecycle), not by whoever first asks
    # for the context; until then it takes no deliveries from the runner either.
    delivery_pool = DeliveryPool(
        settings.webhook_concurrency,
        settings.webhook_max_in_flight_per_key,
        BrokerSource(get_app()),
        DeliverySender(settings, webhooks, record_turns),
    )
    runner = JobRunner(
        settings,
        PriceTable.load(settings.pricing_file),
        upstream,
        limiter,
        leases,
        messenger,
        CallSlots(settings.worker_concurrency),
        delivery_room=delivery_pool,
        record_turns=record_turns,
    )
    return WorkerContext(
        settings=settings,
        messenger=messenger,
        limiter=limiter,
        leases=leases,
        runner=runner,
        webhooks=webhooks,
        deliveries=delivery_pool,
    )
