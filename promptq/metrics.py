"""Prometheus metrics of the whole deployment, computed when scraped.

Why not counters kept by each process: promptq runs many worker processes on many
machines. Counters in each of them would each hold a part of the figures, would reset when a
worker restarts, and would need a pushgateway or a shared multiprocess directory (and
Prometheus finding every worker) to add up. The figures already live where every process
writes them: the jobs in flight in the jobs table, and everything that ended in the hourly
rollups (promptq.rollups) written in the same transactions as the jobs, calls and webhook
attempts they count; the limiter's state and the broker's queues in Redis. Computing them
from there at scrape time gives the same answer from any API process, for any number of
workers, across restarts, and after retention has deleted the jobs.

What a scrape costs follows the work in flight, not the history: the gauges count active
jobs through the partial index that holds only those (queued, running, retrying) and pending
deliveries through theirs; the counters add up rollup rows, and the hours that can no longer
change (older than the last full hour) are added up once per API process and kept, so a
scrape reads only the last two hours' rows. Two Redis round trips for the limiter and one for
the broker's backlog. On PostgreSQL a statement timeout stops a scrape from holding a
connection for long. A failed query or an unreachable Redis raises, and the API answers 503
rather than a partial page.

No label names a client key, a URL or any other caller's data: model names, statuses,
outcomes and HTTP status codes only. Model names come from clients, so their number is
bounded: past `max_models` distinct names (the first seen keep theirs), the rest are summed
under the model `other`, and no client can grow the label set without end.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
from sqlalchemy import BigInteger, func, literal_column, select, text, type_coerce
from sqlalchemy.orm import Session

from promptq.clock import utcnow
from promptq.db import Database, get_sessionmaker, on_postgresql
from promptq.models import (
    LATENCY_BUCKETS_MS,
    RUNNABLE_STATUSES,
    AttemptHourly,
    DeliveryStatus,
    Job,
    JobStatus,
    UsageHourly,
    WebhookDelivery,
    WebhookHourly,
    is_active_job,
)
from promptq.ratelimit.limiter import RedisLimiter
from promptq.redis_keys import MODELS_WAITING
from promptq.rollups import floor_hour
from promptq.rollups.reading import rollup_rows
from promptq.types import picodollars_to_usd

# Upper bounds of the upstream latency histogram, in seconds (the rollups count them in ms).
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = tuple(ms / 1000 for ms in LATENCY_BUCKETS_MS)
# Longest a scrape's query may run on PostgreSQL before it is cancelled (and the scrape
# answered 503): Prometheus gives up on a scrape after 10 s by default anyway.
STATEMENT_TIMEOUT_MS = 8000
TOKEN_KINDS = ("input", "output", "cache_write", "cache_read")
WEBHOOK_ATTEMPT_OUTCOMES = ("succeeded", "http_error", "no_response")
NO_STATUS = "none"  # the status_code label of a call that got no HTTP answer
OTHER_MODEL = "other"
DEFAULT_MAX_MODELS = 50
# The moment before any rollup: where the first scrape of a process starts adding.
BEGINNING = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class ModelJobs:
    """One model's jobs: in flight by status (from the jobs), ended by status with their
    tokens and cost (from the rollups)."""

    by_status: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_KINDS, 0))
    cost_picodollars: int = 0
    oldest_runnable: datetime | None = None

    @property
    def cost(self) -> Decimal:
        return picodollars_to_usd(self.cost_picodollars)

    def add(self, other: ModelJobs) -> None:
        for status, count in other.by_status.items():
            self.by_status[status] = self.by_status.get(status, 0) + count
        for kind in TOKEN_KINDS:
            self.tokens[kind] += other.tokens[kind]
        self.cost_picodollars += other.cost_picodollars
        if other.oldest_runnable is not None:
            current = self.oldest_runnable
            self.oldest_runnable = (
                other.oldest_runnable if current is None else min(current, other.oldest_runnable)
            )


@dataclass
class ModelAttempts:
    """One model's upstream calls: counts by (outcome, status code), and the latency
    histogram as cumulative bucket counts, in LATENCY_BUCKETS_SECONDS order."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_SECONDS))
    count: int = 0
    latency_ms_sum: int = 0

    def add(self, other: ModelAttempts) -> None:
        for key, count in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + count
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.count += other.count
        self.latency_ms_sum += other.latency_ms_sum


@dataclass
class Totals:
    """What the rollups add up to over some hours; additive, so the hours that can no
    longer change are added up once and kept."""

    jobs: dict[str, ModelJobs] = field(default_factory=dict)
    attempts: dict[str, ModelAttempts] = field(default_factory=dict)
    # (kind, name) -> count: ("attempt", outcome) and ("delivery", settled status).
    webhooks: dict[tuple[str, str], int] = field(default_factory=dict)
    # The first hour each model appears in: the order in which names get a label.
    first_seen: dict[str, datetime] = field(default_factory=dict)

    def add(self, other: Totals) -> None:
        for model, jobs in other.jobs.items():
            self.jobs.setdefault(model, ModelJobs()).add(jobs)
        for model, attempts in other.attempts.items():
            self.attempts.setdefault(model, ModelAttempts()).add(attempts)
        for key, count in other.webhooks.items():
            self.webhooks[key] = self.webhooks.get(key, 0) + count
        for model, hour in other.first_seen.items():
            seen = self.first_seen.get(model)
            self.first_seen[model] = hour if seen is None else min(seen, hour)

    def copy(self) -> Totals:
        copied = Totals()
        copied.add(self)
        return copied


@dataclass(frozen=True)
class LimiterState:
    """What `promptq limits` shows of a model's bucket, as numbers."""

    model: str
    waiting: int
    in_flight: int
    paused_seconds: float


def _sum(column: Any) -> Any:
    # The raw integers (picodollars for money), summed exactly on every database.
    return func.coalesce(func.sum(type_coerce(column, BigInteger)), 0)


class MetricsRepository:
    """The scrape's queries: each reads the jobs in flight or rollup rows of a range of
    hours, and returns a row per group."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def bound_statement_time(self) -> None:
        if on_postgresql(self.session):
            # SET LOCAL: for this transaction only; the connection goes back to the pool as
            # it came.
            self.session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))

    def active_jobs(self) -> dict[str, ModelJobs]:
        """Jobs in flight by model and status, and the oldest waiting one, through the
        partial index of active jobs (an index-only scan on PostgreSQL)."""
        query = (
            select(Job.model, Job.status, func.count(), func.min(Job.created_at))
            .where(is_active_job())
            .group_by(Job.model, Job.status)
        )
        models: dict[str, ModelJobs] = defaultdict(ModelJobs)
        for model, status, count, oldest in self.session.execute(query):
            jobs = models[model]
            jobs.by_status[status] = int(count)
            if status in RUNNABLE_STATUSES and oldest is not None:
                current = jobs.oldest_runnable
                jobs.oldest_runnable = oldest if current is None else min(current, oldest)
        return dict(models)

    def pending_deliveries(self) -> int:
        """Deliveries still to send, through their partial index."""
        query = select(func.count()).where(WebhookDelivery.status == literal_column("'pending'"))
        return int(self.session.scalar(query) or 0)

    def totals(self, since: datetime, until: datetime | None) -> Totals:
        """The rollups of the hours in [since, until) (until None: every later hour)."""
        totals = Totals()

        def hours(column: Any) -> list[Any]:
            where = [column >= since]
            if until is not None:
                where.append(column < until)
            return where

        usage = rollup_rows(UsageHourly)
        jobs_query = select(
            usage.c.model,
            usage.c.status,
            func.min(usage.c.hour),
            _sum(usage.c.jobs),
            _sum(usage.c.input_tokens),
            _sum(usage.c.output_tokens),
            _sum(usage.c.cache_creation_input_tokens),
            _sum(usage.c.cache_read_input_tokens),
            _sum(usage.c.cost_total),
        ).where(*hours(usage.c.hour))
        for model, status, first, count, *tokens, cost in self.session.execute(
            jobs_query.group_by(usage.c.model, usage.c.status)
        ):
            jobs = totals.jobs.setdefault(model, ModelJobs())
            jobs.by_status[status] = jobs.by_status.get(status, 0) + int(count)
            for kind, value in zip(TOKEN_KINDS, tokens, strict=True):
                jobs.tokens[kind] += int(value)
            jobs.cost_picodollars += int(cost)
            _seen(totals, model, first)

        calls = rollup_rows(AttemptHourly)
        buckets = [_sum(calls.c[f"le_{i}"]) for i in range(len(LATENCY_BUCKETS_MS))]
        attempts_query = select(
            calls.c.model,
            calls.c.outcome,
            calls.c.status_code,
            func.min(calls.c.hour),
            _sum(calls.c.attempts),
            _sum(calls.c.latency_ms_sum),
            *buckets,
        ).where(*hours(calls.c.hour))
        for model, outcome, status_code, first, count, latency, *counts in self.session.execute(
            attempts_query.group_by(calls.c.model, calls.c.outcome, calls.c.status_code)
        ):
            attempts = totals.attempts.setdefault(model, ModelAttempts())
            key = (outcome, status_code)
            attempts.counts[key] = attempts.counts.get(key, 0) + int(count)
            attempts.count += int(count)
            attempts.latency_ms_sum += int(latency)
            attempts.buckets = [a + int(b) for a, b in zip(attempts.buckets, counts, strict=True)]
            _seen(totals, model, first)

        hooks = rollup_rows(WebhookHourly)
        webhooks_query = (
            select(hooks.c.kind, hooks.c.name, _sum(hooks.c.count))
            .where(*hours(hooks.c.hour))
            .group_by(hooks.c.kind, hooks.c.name)
        )
        for kind, name, count in self.session.execute(webhooks_query):
            totals.webhooks[(kind, name)] = totals.webhooks.get((kind, name), 0) + int(count)
        return totals


def _seen(totals: Totals, model: str, hour: datetime) -> None:
    seen = totals.first_seen.get(model)
    totals.first_seen[model] = hour if seen is None else min(seen, hour)


def label_models(
    first_seen: dict[str, datetime], active: Iterable[str], max_models: int
) -> dict[str, str]:
    """Each model name's label: its own for the first `max_models` names seen (by the
    first hour they appear in the rollups, then name; models only in flight come after
    those), OTHER_MODEL for the rest. Stable: a name once labelled keeps its label."""
    known = sorted(first_seen, key=lambda model: (first_seen[model], model))
    known += sorted(set(active) - set(first_seen))
    return {
        model: model if index < max_models else OTHER_MODEL for index, model in enumerate(known)
    }


def read_limiter_state(client: redis.Redis, models: Iterable[str]) -> list[LimiterState]:
    """Per model: jobs queued for budget, calls holding a live slot, and how long the model
    stays paused after an upstream 429. The same Redis keys `promptq limits` reads
    (RedisLimiter.snapshot), in two pipelined round trips for all models together instead of a
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
            state, inflight, _, costs, *_ = RedisLimiter.keys(model)
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
        database: Database,
        redis_client: redis.Redis | None,
        broker_backlog: Callable[[], int] | None = None,
        max_models: int = DEFAULT_MAX_MODELS,
    ) -> None:
        self.database = database
        self.redis = redis_client
        self.broker_backlog = broker_backlog
        self.max_models = max_models
        # The rollups of the hours before `_closed_before`, added up once: no transaction
        # writes to an hour that ended more than an hour ago (each recording takes its hour
        # from its own clock, and lasts milliseconds).
        self._closed = Totals()
        self._closed_before = BEGINNING
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        # Nothing to check for clashes on this dedicated registry, and registering must not
        # query the database.
        return []

    def _read(self, repository: MetricsRepository, now: datetime) -> Totals:
        """Every hour's rollups: the closed ones from memory (topped up with the hours that
        closed since the last scrape), the last two read afresh."""
        horizon = floor_hour(now) - timedelta(hours=1)
        with self._lock:
            if horizon > self._closed_before:
                self._closed.add(repository.totals(self._closed_before, horizon))
                self._closed_before = horizon
            totals = self._closed.copy()
            since = self._closed_before
        totals.add(repository.totals(since, None))
        return totals

    def collect(self) -> Iterable[Metric]:
        # Everything is read before anything is returned: a failure is an error for the
        # whole scrape, never a page with half the figures.
        started = time.perf_counter()
        now = utcnow()
        with get_sessionmaker(self.database)() as session:
            repository = MetricsRepository(session)
            repository.bound_statement_time()
            active = repository.active_jobs()
            pending = repository.pending_deliveries()
            totals = self._read(repository, now)
            session.rollback()
        limiter: list[LimiterState] = []
        backlog: int | None = None
        labels = label_models(totals.first_seen, active, self.max_models)
        if self.redis is not None:
            limiter = read_limiter_state(self.redis, labels)
        if self.broker_backlog is not None:
            backlog = self.broker_backlog()
        jobs: dict[str, ModelJobs] = {}
        for source in (totals.jobs, active):
            for model, summary in source.items():
                jobs.setdefault(labels[model], ModelJobs()).add(summary)
        attempts: dict[str, ModelAttempts] = {}
        for model, calls in totals.attempts.items():
            attempts.setdefault(labels[model], ModelAttempts()).add(calls)
        metrics = [
            *_job_metrics(jobs, now),
            *_attempt_metrics(attempts),
            *_webhook_metrics(pending, totals.webhooks),
            *_limiter_metrics(_fold_limiter(limiter, labels)),
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


def _fold_limiter(states: Sequence[LimiterState], labels: dict[str, str]) -> list[LimiterState]:
    """The limiter's figures under the models' labels: summed, the longest pause kept."""
    folded: dict[str, LimiterState] = {}
    for state in states:
        label = labels.get(state.model, OTHER_MODEL)
        seen = folded.get(label)
        if seen is None:
            folded[label] = LimiterState(
                label, state.waiting, state.in_flight, state.paused_seconds
            )
        else:
            folded[label] = LimiterState(
                label,
                seen.waiting + state.waiting,
                seen.in_flight + state.in_flight,
                max(seen.paused_seconds, state.paused_seconds),
            )
    return list(folded.values())


def _job_metrics(jobs: dict[str, ModelJobs], now: datetime) -> list[Metric]:
    by_status = GaugeMetricFamily(
        "promptq_jobs",
        "Jobs by model and status: those in flight (queued, running, retrying) as they are "
        "now, the ended ones (succeeded, failed, canceled) counted since the start, deleted "
        "or not.",
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


def _webhook_metrics(pending: int, webhooks: dict[tuple[str, str], int]) -> list[Metric]:
    by_status = GaugeMetricFamily(
        "promptq_webhook_deliveries",
        "Webhook deliveries (one per event and URL) by status: pending (being tried or "
        "waiting for a retry) as they are now; succeeded, failed (gave up, or 410 Gone) "
        "counted since the start.",
        labels=["status"],
    )
    settled = {name: count for (kind, name), count in webhooks.items() if kind == "delivery"}
    for status in sorted({*(s.value for s in DeliveryStatus), *settled}):
        count = pending if status == DeliveryStatus.PENDING else settled.get(status, 0)
        by_status.add_metric([status], count)
    outcomes = CounterMetricFamily(
        "promptq_webhook_attempts_total",
        "Webhook delivery attempts by outcome: succeeded (2xx in time), http_error (any other "
        "answer), no_response (refused, timed out or blocked).",
        labels=["outcome"],
    )
    for outcome in WEBHOOK_ATTEMPT_OUTCOMES:
        outcomes.add_metric([outcome], webhooks.get(("attempt", outcome), 0))
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
