"""What a worker process builds once and shares between its threads."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from promptq.pricing import PriceTable

from promptq.config import Settings, get_settings
from promptq.upstream import UpstreamClient
from worker.leases import LeaseKeeper


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    prices: PriceTable
    upstream: UpstreamClient
    leases: LeaseKeeper


@lru_cache(maxsize=1)
def worker_context() -> WorkerContext:
    settings = get_settings()
    return WorkerContext(
        settings=settings,
        prices=PriceTable.load(settings.pricing_file),
        upstream=UpstreamClient(
            settings.upstream_url,
            settings.upstream_key,
            timeout=settings.upstream_timeout_seconds,
            connect_timeout=settings.upstream_connect_timeout_seconds,
        ),
        leases=LeaseKeeper(settings),
    )
