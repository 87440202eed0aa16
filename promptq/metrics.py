"""Prometheus metrics of the whole deployment, computed when scraped.

Why not counters kept by each process: promptq runs many worker processes on many
machines. Counters in each of them would each hold a part of the figures, would reset when a
worker restarts, and would need a pushgateway or a shared multiprocess directory (and
Prometheus finding every worker) to add up. The figures already live where every process
writes them: a row per job (status, model, tokens, cost), a row per upstream call (status
code, outcome, latency), a row per webhook delivery and attempt in the database, and the
limiter's state and the broker's queues in Redis. Computing them from there at scrape time
gives the same answer from any API process, for any number of workers, across restarts.

What a scrape costs: four grouped queries (jobs; attempts joined to their jobs; webhook
deliveries; webhook attempts) that return a row per group, never a row per job or call,
and two Redis round trips for the limiter plus one for the broker's backlog. The grouped
queries read every row of their tables (no index can avoid that for an all-time sum), so
their cost grows with the history kept; on PostgreSQL a statement timeout stops a scrape
from holding a connection for long. A failed query or an unreachable Redis raises, and the
API answers 503 rather than a partial page.

No label names a client key, a URL or any other caller's data: model names, statuses,
outcomes and HTTP status codes only.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select, text
from sqlalchemy.orm import Session

from promptq.db import get_sessionmaker
from promptq.models import (
    RUNNABLE_STATUSES,
    Attempt,
    DeliveryStatus,
    Job,
    JobStatus,
    WebhookAttempt,
    WebhookDelivery,
)
from promptq.ratelimit.limiter import MODELS_WAITING, Limiter
from promptq.types import utcnow

# Upper bounds of the upstream latency histogram, in seconds: a model answers in well under
# a second to several minutes (long outputs, extended thinking), up to the 600 s timeout.
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
# Longest a scrape's query may run on PostgreSQL before it is cancelled (and the scrape
# answered 503): Prometheus gives up on a scrape after 10 s by default anyway.
STATEMENT_TIMEOUT_MS = 8000
TOKEN_KINDS = ("input", "output", "cache_write", "cache_read")
WEBHOOK_ATTEMPT_OUTCOMES = ("succeeded", "http_error", "no_response")
NO_STATUS = "none"  # the status_code label of a call that got no HTTP answer


@dataclass
class ModelJobs:
    """One model's jobs, summed over its rows."""

    by_status: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_KINDS, 0))
    cost: Decimal = Decimal(0)
    oldest_runnable: datetime | None = None


@dataclass
class ModelAttempts:
    """One model's upstream calls: counts by (outcome, status code), and the latency
    histogram as cumulative bucket counts, in LATENCY_BUCKETS_SECONDS order."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_SECONDS))
    count: int = 0
    latency_ms_sum: int = 0


@dataclass(frozen=True)
class LimiterState:
    """What `promptq limits` shows of a model's bucket, as numbers."""

    model: str
    waiting: int
    in_flight: int
    paused_seconds: float


class MetricsRepository:
    """The scrape's queries: each returns a row per group, whatever the table's size."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def bound_statement_time(self) -> None:
        if self.session.get_bind().dialect.name == "postgresql":
            # SET LOCAL: for this transaction only; the connection goes back to the pool as
            # it came.
            self.session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))

    def jobs_by_model(self) -> dict[str, ModelJobs]:
        """Counts, tokens and cost by model and status, in one pass over the jobs. The cost
        is summed as integer picodollars in SQL (exact on every database); Money turns the
        sum into a Decimal."""
        query = select(
            Job.model,
            Job.status,
            func.count(),
            func.sum(Job.input_tokens),
            func.sum(Job.output_tokens),
            func.sum(Job.cache_creation_input_tokens),
            func.sum(Job.cache_read_input_tokens),
            func.sum(Job.cost_total),
            func.min(Job.created_at),
        ).group_by(Job.model, Job.status)
        models: dict[str, ModelJobs] = defaultdict(ModelJobs)
        for model, status, count, *token_sums, cost, oldest in self.session.execute(query):
            jobs = models[model]
            jobs.by_status[status] = int(count)
            for kind, value in zip(TOKEN_KINDS, token_sums, strict=True):
                jobs.tokens[kind] += int(value or 0)
            jobs.cost += cost or Decimal(0)
            if status in RUNNABLE_STATUSES and oldest is not None:
                current = jobs.oldest_runnable
                jobs.oldest_runnable = oldest if current is None else min(current, oldest)
        return dict(models)

    def attempts_by_model(self) -> dict[str, ModelAttempts]:
        """Upstream calls by model, outcome and status code, with the latency histogram's
        buckets counted in the same grouped query (a SUM of CASE per bucket)."""
        buckets = [
            func.sum(case((Attempt.latency_ms <= round(bound * 1000), 1), else_=0))
            for bound in LATENCY_BUCKETS_SECONDS
        ]
        query = (
            select(
                Job.model,
                Attempt.outcome,
                Attempt.status_code,
                func.count(),
                func.sum(Attempt.latency_ms),
                *buckets,
            )
            .join(Job, Job.id == Attempt.job_id)
            .group_by(Job.model, Attempt.outcome, Attempt.status_code)
        )
        models: dict[str, ModelAttempts] = defaultdict(ModelAttempts)
        for model, outcome, status_code, count, latency_sum, *bucket_counts in self.session.execute(
            query
        ):
            attempts = models[model]
            key = (outcome, str(status_code) if status_code is not None else NO_STATUS)
            attempts.counts[key] = attempts.counts.get(key, 0) + int(count)
            attempts.count += int(count)
            attempts.latency_ms_sum += int(latency_sum or 0)
            for index, value in enumerate(bucket_counts):
                attempts.buckets[index] += int(value or 0)
        return dict(models)

    def deliveries_by_status(self) -> dict[str, int]:
        # Grouped on the leading column of ix_deliveries_status_next.
        query = select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
        return {status: int(count) for status, count in self.session.execute(query)}

    def webhook_attempts_by_outcome(self) -> dict[str, int]:
        """`succeeded`: a 2xx in time; `http_error`: any other answer; `no_response`: none
        came (refused, timed out, blocked as a private address)."""
        outcome = case(
            (WebhookAttempt.status_code.is_(None), "no_response"),
            (
                WebhookAttempt.error.is_(None)
                & (WebhookAttempt.status_code >= 200)
                & (WebhookAttempt.status_code < 300),
                "succeeded",
            ),
            else_="http_error",
        )
        query = select(outcome, func.count()).group_by(outcome)
        return {str(name): int(count) for name, count in self.session.execute(query)}


def read_limiter_state(client: redis.Redis, models: Iterable[str]) -> list[LimiterState]:
    """Per model: jobs queued for budget, calls holding a live slot, and how long the model
    stays paused after an upstream 429. The same Redis keys `promptq limits` reads
    (Limiter.snapshot), in two pipelined round trips for all models together instead of a
    script run and several commands per model."""
    with client.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.smembers(MODELS_WAITING)
        (seconds, micros), waiting_models = pipe.execute()
    now_ms = seconds * 1000 + micros / 1000
    names = sorted(set(models) | {_text(m) for m in waiting_models})
    if not names:
        return []
    with client.pipeline(transaction=False) as pipe:
        for model in names:
            state, inflight, _, costs, *_ = Limiter.keys(model)
            pipe.hget(state, "paused_until")
            # Every waiting job has its cost noted (only each key's first stands in line).
            pipe.hlen(costs)
            # A slot's score is its lease's expiry: one past it belongs to a worker that
            # died, and no longer counts.
            pipe.zcount(inflight, now_ms, "+inf")
        replies = pipe.execute()
    return [
        LimiterState(
            model=model,
            waiting=int(replies[3 * index + 1]),
            in_flight=int(replies[3 * index + 2]),
            paused_seconds=max(0.0, (float(replies[3 * index] or 0) - now_ms) / 1000),
        )
        for index, model in enumerate(names)
    ]


class PromptqCollector(Collector):
    """Every promptq_* metric, read from the database and Redis at each collect()."""

    def __init__(
        self,
        database_url: str,
        redis_client: redis.Redis | None,
        broker_backlog: Callable[[], int] | None = None,
    ) -> None:
        self.database_url = database_url
        self.redis = redis_client
        self.broker_backlog = broker_backlog

    def describe(self) -> Iterable[Metric]:
        # Nothing to check for clashes on this dedicated registry, and registering must not
        # query the database.
        return []

    def collect(self) -> Iterable[Metric]:
        # Everything is read before anything is returned: a failure is an error for the
        # whole scrape, never a page with half the figures.
        started = time.perf_counter()
        with get_sessionmaker(self.database_url)() as session:
            repository = MetricsRepository(session)
            repository.bound_statement_time()
            jobs = repository.jobs_by_model()
            attempts = repository.attempts_by_model()
            deliveries = repository.deliveries_by_status()
            webhook_attempts = repository.webhook_attempts_by_outcome()
            session.rollback()
        now = utcnow()
        limiter: list[LimiterState] = []
        backlog: int | None = None
        if self.redis is not None:
            limiter = read_limiter_state(self.redis, jobs)
        if self.broker_backlog is not None:
            backlog = self.broker_backlog()
        metrics = [
            *_job_metrics(jobs, now),
            *_attempt_metrics(attempts),
            *_webhook_metrics(deliveries, webhook_attempts),
            *_limiter_metrics(limiter),
        ]
        if backlog is not None:
            metrics.append(
                GaugeMetricFamily(
                    "promptq_broker_backlog_messages",
                    "Job messages waiting in the broker's queue (every priority), not yet "
                    "taken by a worker.",
                    value=backlog,
                )
            )
        metrics.append(
            GaugeMetricFamily(
                "promptq_metrics_scrape_duration_seconds",
                "How long this scrape's queries took (database and Redis).",
                value=time.perf_counter() - started,
            )
        )
        return metrics


def _job_metrics(jobs: dict[str, ModelJobs], now: datetime) -> list[Metric]:
    by_status = GaugeMetricFamily(
        "promptq_jobs",
        "Jobs in the database by model and current status.",
        labels=["model", "status"],
    )
    created = CounterMetricFamily(
        "promptq_jobs_created_total", "Jobs ever accepted, by model.", labels=["model"]
    )
    depth = GaugeMetricFamily(
        "promptq_queue_depth",
        "Jobs waiting to run (queued, or retrying after a failed attempt), by model.",
        labels=["model"],
    )
    oldest = GaugeMetricFamily(
        "promptq_queue_oldest_age_seconds",
        "Age of the oldest job waiting to run (queued or retrying), by model; 0 when none waits.",
        labels=["model"],
    )
    tokens = CounterMetricFamily(
        "promptq_tokens_total",
        "Tokens of finished jobs by model and kind (input, output, cache_write, cache_read).",
        labels=["model", "kind"],
    )
    cost = CounterMetricFamily(
        "promptq_cost_usd_total",
        "Cost of finished jobs in US dollars, by model (summed exactly in picodollars).",
        labels=["model"],
    )
    for model in sorted(jobs):
        summary = jobs[model]
        for status in JobStatus:
            by_status.add_metric([model, status.value], summary.by_status.get(status, 0))
        created.add_metric([model], sum(summary.by_status.values()))
        depth.add_metric([model], sum(summary.by_status.get(s, 0) for s in RUNNABLE_STATUSES))
        age = (now - summary.oldest_runnable).total_seconds() if summary.oldest_runnable else 0.0
        oldest.add_metric([model], max(0.0, age))
        for kind in TOKEN_KINDS:
            tokens.add_metric([model, kind], summary.tokens[kind])
        # A float only here, at the edge: the exposition format has no decimals.
        cost.add_metric([model], float(summary.cost))
    return [by_status, created, depth, oldest, tokens, cost]


def _attempt_metrics(attempts: dict[str, ModelAttempts]) -> list[Metric]:
    calls = CounterMetricFamily(
        "promptq_upstream_attempts_total",
        "Upstream calls by model, outcome (succeeded, transient: retried if attempts remain, "
        "permanent) and HTTP status code ('none' when no answer came).",
        labels=["model", "outcome", "status_code"],
    )
    throttled = CounterMetricFamily(
        "promptq_upstream_rate_limited_total",
        "Upstream calls answered 429 (rate limited), by model.",
        labels=["model"],
    )
    latency = HistogramMetricFamily(
        "promptq_upstream_latency_seconds",
        "Upstream call latency by model, as recorded with each attempt.",
        labels=["model"],
    )
    for model in sorted(attempts):
        summary = attempts[model]
        for (outcome, status_code), count in sorted(summary.counts.items()):
            calls.add_metric([model, outcome, status_code], count)
        throttled.add_metric(
            [model],
            sum(count for (_, status), count in summary.counts.items() if status == "429"),
        )
        latency.add_metric(
            [model],
            buckets=[
                *(
                    (_bound(b), c)
                    for b, c in zip(LATENCY_BUCKETS_SECONDS, summary.buckets, strict=True)
                ),
                ("+Inf", summary.count),
            ],
            sum_value=summary.latency_ms_sum / 1000,
        )
    return [calls, throttled, latency]


def _webhook_metrics(deliveries: dict[str, int], attempts: dict[str, int]) -> list[Metric]:
    by_status = GaugeMetricFamily(
        "promptq_webhook_deliveries",
        "Webhook deliveries (one per event and URL) by status: pending (being tried or "
        "waiting for a retry), succeeded, failed (gave up, or 410 Gone).",
        labels=["status"],
    )
    for status in sorted({*(s.value for s in DeliveryStatus), *deliveries}):
        by_status.add_metric([status], deliveries.get(status, 0))
    outcomes = CounterMetricFamily(
        "promptq_webhook_attempts_total",
        "Webhook delivery attempts by outcome: succeeded (2xx in time), http_error (any other "
        "answer), no_response (refused, timed out or blocked).",
        labels=["outcome"],
    )
    for outcome in WEBHOOK_ATTEMPT_OUTCOMES:
        outcomes.add_metric([outcome], attempts.get(outcome, 0))
    return [by_status, outcomes]


def _limiter_metrics(states: Sequence[LimiterState]) -> list[Metric]:
    waiting = GaugeMetricFamily(
        "promptq_limiter_waiting_jobs",
        "Jobs queued in the rate limiter for their model's budget.",
        labels=["model"],
    )
    in_flight = GaugeMetricFamily(
        "promptq_limiter_in_flight",
        "Upstream calls holding one of the model's concurrency slots.",
        labels=["model"],
    )
    paused = GaugeMetricFamily(
        "promptq_limiter_paused_seconds",
        "Seconds until the model's pause after an upstream 429 ends; 0 when not paused.",
        labels=["model"],
    )
    for state in states:
        waiting.add_metric([state.model], state.waiting)
        in_flight.add_metric([state.model], state.in_flight)
        paused.add_metric([state.model], state.paused_seconds)
    return [waiting, in_flight, paused]


def _bound(seconds: float) -> str:
    return repr(float(seconds))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
