"""SQLAlchemy 2.0 tables. The database is the source of truth; the broker carries only ids."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    literal_column,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from promptq.clock import utcnow
from promptq.priority import Priority
from promptq.types import EnumString, Money, UTCDateTime


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), Decimal: Money(), dict[str, Any]: JSON()}


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
# A job in one of these may be claimed by a worker (once its next_attempt_at has come).
RUNNABLE_STATUSES = (JobStatus.QUEUED, JobStatus.RETRYING)
# The work in flight: what the partial indexes of active jobs hold. Finished jobs, however
# many are kept, are in none of them, so every query through them costs what is in flight.
ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.RETRYING)
ACTIVE_JOBS_WHERE = "status IN ('queued', 'running', 'retrying')"
# Ended jobs whose end is not yet in the ledger and rollups: only those of the previous
# release (or ended by its processes during an upgrade), until the backfill has run.
ENDED_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)
UNACCOUNTED_JOBS_WHERE = "accounted = 0 AND status IN ('succeeded', 'failed', 'canceled')"


class DeliveryStatus(StrEnum):
    """Where a webhook delivery stands (and, on a job, its latest delivery)."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # SHA-256 of the key: keys are 190+ bits of randomness, so a fast hash is safe and lets
    # every request find its key with one indexed lookup.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    # Needed in the clear to sign webhooks; never returned after creation.
    webhook_secret: Mapped[str] = mapped_column(String(100))
    rpm: Mapped[int | None]
    monthly_budget_usd: Mapped[Decimal | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    # The model patterns this key may use (shell-style, as in the limits file); None: all.
    models: Mapped[list[str] | None] = mapped_column(JSON)
    # Per-key overrides of the quota settings, by name (promptq.keys.policy.QUOTAS).
    quotas: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_key_id", "api_key_id", "id"),
        Index("ix_jobs_key_status_id", "api_key_id", "status", "id"),
        UniqueConstraint("api_key_id", "idempotency_key", name="uq_jobs_key_idempotency"),
        Index("ix_jobs_batch_status", "batch_id", "status"),
        # Partial: only active jobs. The sweeper's passes walk this one in id order.
        Index(
            "ix_jobs_active",
            "id",
            postgresql_where=text(ACTIVE_JOBS_WHERE),
            sqlite_where=text(ACTIVE_JOBS_WHERE),
        ),
        # Partial: the /metrics gauges (count and oldest by model and status), index only.
        Index(
            "ix_jobs_active_model",
            "model",
            "status",
            "created_at",
            postgresql_where=text(ACTIVE_JOBS_WHERE),
            sqlite_where=text(ACTIVE_JOBS_WHERE),
        ),
        # Partial: ended jobs not yet in the ledger and rollups (empty once backfilled).
        Index(
            "ix_jobs_unaccounted",
            "id",
            postgresql_where=text(UNACCOUNTED_JOBS_WHERE),
            sqlite_where=text(UNACCOUNTED_JOBS_WHERE),
        ),
        # Partial: the dashboard's latest failures, newest first.
        Index(
            "ix_jobs_failed_finished",
            "finished_at",
            "id",
            postgresql_where=text("status = 'failed'"),
            sqlite_where=text("status = 'failed'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    status: Mapped[JobStatus] = mapped_column(EnumString(JobStatus, 16), default=JobStatus.QUEUED)
    model: Mapped[str] = mapped_column(String(200))
    priority: Mapped[Priority] = mapped_column(EnumString(Priority, 8), default=Priority.NORMAL)
    request: Mapped[dict[str, Any]]
    # `metadata` is reserved on declarative classes, hence the trailing underscore.
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    webhook_url: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # When a queued or retrying job may next be claimed (None: now).
    next_attempt_at: Mapped[datetime | None]
    # What a runnable job is waiting for, when it is held back: a rate limit of its model
    # (rpm, input_tpm, output_tpm, concurrency, upstream_backoff, queue) or its key (key_rpm).
    waiting_for: Mapped[str | None] = mapped_column(String(32))
    # Until when the worker that claimed it owns it; past this the sweeper takes it back.
    lease_expires_at: Mapped[datetime | None]

    result: Mapped[dict[str, Any] | None]
    output_text: Mapped[str | None] = mapped_column(Text)
    input_tokens: Mapped[int | None]
    output_tokens: Mapped[int | None]
    cache_creation_input_tokens: Mapped[int | None]
    cache_read_input_tokens: Mapped[int | None]
    cost_input: Mapped[Decimal | None]
    cost_output: Mapped[Decimal | None]
    cost_cache_write: Mapped[Decimal | None]
    cost_cache_read: Mapped[Decimal | None]
    cost_total: Mapped[Decimal | None]
    # The prices the job was charged at (USD per million tokens), kept with the job so that
    # a later price change never rewrites history.
    prices: Mapped[dict[str, Any] | None]

    error_type: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    upstream_status: Mapped[int | None]
    # The latest delivery to webhook_url, as the job object shows it.
    webhook_status: Mapped[DeliveryStatus | None] = mapped_column(EnumString(DeliveryStatus, 16))
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)

    # Set for the requests of a Message Batch: the batch, and the request's own custom_id.
    batch_id: Mapped[str | None] = mapped_column(
        ForeignKey("message_batches.id", name="fk_jobs_batch"), nullable=True
    )
    custom_id: Mapped[str | None] = mapped_column(String(64))
    # The client's anthropic-beta header, sent with every upstream call of the job: beta
    # features (and the parameters only they accept) work through promptq as they do direct.
    anthropic_beta: Mapped[str | None] = mapped_column(String(500))
    # 1 once the job's end is in the spend ledger, the usage rollup and its batch's counts:
    # set by the transaction that ends it (or by promptq.jobs.backfill for jobs ended
    # before those existed), so that each end is counted exactly once.
    accounted: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    attempt_records: Mapped[list[Attempt]] = relationship(
        back_populates="job", order_by="Attempt.number", lazy="raise"
    )


def is_active_job() -> ColumnElement[bool]:
    """ACTIVE_JOBS_WHERE as a query term, with its statuses as constants: a query that
    includes it reads the partial indexes of active jobs (SQLite uses a partial index only
    for a query that repeats its WHERE term; PostgreSQL must see constants, not bound
    parameters, to prove a query implies it)."""
    return Job.status.in_([literal_column(f"'{status.value}'") for status in ACTIVE_STATUSES])


def is_unaccounted_job() -> ColumnElement[bool]:
    """UNACCOUNTED_JOBS_WHERE as a query term (see is_active_job)."""
    return (Job.accounted == literal_column("0")) & has_status(*ENDED_STATUSES)


def has_status(*statuses: JobStatus) -> ColumnElement[bool]:
    """`status IN (...)`, or `status = ...` for one, with constants, for the same reason as
    is_active_job (ix_jobs_failed_finished is WHERE status = 'failed')."""
    values: list[ColumnElement[Any]] = [
        literal_column(f"'{JobStatus(status).value}'") for status in statuses
    ]
    return Job.status == values[0] if len(values) == 1 else Job.status.in_(values)


class BatchStatus(StrEnum):
    """Anthropic's processing_status of a Message Batch."""

    IN_PROGRESS = "in_progress"
    CANCELING = "canceling"
    ENDED = "ended"


class MessageBatch(Base):
    """A Message Batch: its requests are ordinary jobs carrying its id. Its request counts
    are counters on this row, moved in the transaction that ends each request (a request
    ends once, by a compare-and-set), so that reading a batch's progress, and deciding
    that its last request has ended, never counts its requests."""

    __tablename__ = "message_batches"
    __table_args__ = (
        Index("ix_batches_key_id", "api_key_id", "id"),
        Index("ix_batches_status_expires", "processing_status", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    processing_status: Mapped[BatchStatus] = mapped_column(
        EnumString(BatchStatus, 16), default=BatchStatus.IN_PROGRESS
    )
    request_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    cancel_initiated_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    # A deleted batch is hidden, not erased: its jobs' costs stay on the books.
    deleted_at: Mapped[datetime | None]
    # Anthropic's request_counts: requests not yet ended, and the ended ones by result.
    processing_count: Mapped[int] = mapped_column(Integer, default=0)
    succeeded_count: Mapped[int] = mapped_column(Integer, default=0)
    errored_count: Mapped[int] = mapped_column(Integer, default=0)
    canceled_count: Mapped[int] = mapped_column(Integer, default=0)
    expired_count: Mapped[int] = mapped_column(Integer, default=0)


class Attempt(Base):
    """One upstream call: what was asked, when, and what came back."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int]
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime]
    latency_ms: Mapped[int]
    outcome: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None]
    upstream_request_id: Mapped[str | None] = mapped_column(String(200))
    error_type: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    # 1 once the call is in the attempt rollup (see Job.accounted).
    accounted: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    job: Mapped[Job] = relationship(back_populates="attempt_records")


class WebhookSubscription(Base):
    """A REST hook: every job of the key that ends with one of `events` is sent to `url`."""

    __tablename__ = "webhook_subscriptions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Since when every attempt to this URL has failed (None: the last one succeeded).
    failing_since: Mapped[datetime | None]
    # Set when the receiver answered 410 Gone, or had been failing for days.
    disabled_at: Mapped[datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(Text)


class WebhookDelivery(Base):
    """One event sent to one URL, however many attempts it takes."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # Partial: only deliveries still to send, in the order they fall due.
        Index(
            "ix_deliveries_pending_next",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        # Deleting a subscription sets its deliveries' subscription_id to NULL: without
        # this, every unsubscribe reads every delivery ever made.
        Index("ix_deliveries_subscription", "subscription_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # The webhook-id header: the same on every attempt and redelivery of one event, so a
    # receiver can drop what it already handled.
    event_id: Mapped[str] = mapped_column(String(40))
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    subscription_id: Mapped[str | None] = mapped_column(
        ForeignKey(
            "webhook_subscriptions.id", ondelete="SET NULL", name="fk_deliveries_subscription"
        )
    )
    url: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(String(32))
    # The body as first sent, so that every attempt sends the same bytes.
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[DeliveryStatus] = mapped_column(
        EnumString(DeliveryStatus, 16), default=DeliveryStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int]
    started_at: Mapped[datetime]
    latency_ms: Mapped[int]
    status_code: Mapped[int | None]
    response_excerpt: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)


class PromptTemplate(Base):
    """A prompt with Jinja2 placeholders; whatever JSON is posted to its jobs endpoint fills
    them in, so any webhook source can start a job with its own payload."""

    __tablename__ = "prompt_templates"
    __table_args__ = (UniqueConstraint("api_key_id", "name", name="uq_templates_key_name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    name: Mapped[str] = mapped_column(String(100))
    prompt: Mapped[str] = mapped_column(Text)
    system: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(200))
    max_tokens: Mapped[int | None]
    temperature: Mapped[float | None]
    webhook_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BudgetReservation(Base):
    """The most a running job of a key with a monthly budget may cost, held from its claim
    until its attempt is recorded: what concurrent jobs have in flight counts against the
    budget, so together they cannot overshoot it. A row of its own rather than a counter, so
    that a killed worker's reservation goes when the sweeper takes its job back, and only
    reservations of running jobs are ever counted."""

    __tablename__ = "budget_reservations"
    __table_args__ = (Index("ix_budget_reservations_key", "api_key_id"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    amount: Mapped[Decimal]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SpendLedger(Base):
    """A key's recorded spend in one calendar month (UTC), in picodollars: the sum of the
    cost_total of its jobs that finished in that month, kept as the costs are recorded (in
    the same transaction), so that a budget check reads one row instead of summing the
    month's jobs. It outlives the jobs: retention deletes jobs, never money."""

    __tablename__ = "spend_ledger"

    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    # "YYYY-MM": the month of the jobs' finished_at, in UTC.
    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    spent: Mapped[Decimal]
    # How many jobs with a recorded cost the month's spend adds up.
    jobs: Mapped[int] = mapped_column(Integer, default=0)


# Upper bounds of the upstream latency histogram, in milliseconds; /metrics shows them in
# seconds. A model answers in well under a second to several minutes, up to the 600 s timeout.
LATENCY_BUCKETS_MS = (100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000, 600000)


class _UsageFigures:
    """usage_hourly's columns, shared with usage_hourly_shards."""

    hour: Mapped[datetime] = mapped_column(primary_key=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    # Whether these jobs have a recorded cost (usage reports count only those).
    priced: Mapped[bool] = mapped_column(primary_key=True)
    jobs: Mapped[int] = mapped_column(Integer)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    cache_creation_input_tokens: Mapped[int] = mapped_column(BigInteger)
    cache_read_input_tokens: Mapped[int] = mapped_column(BigInteger)
    cost_total: Mapped[Decimal]
    cost_input: Mapped[Decimal]
    cost_output: Mapped[Decimal]
    cost_cache_write: Mapped[Decimal]
    cost_cache_read: Mapped[Decimal]


class _AttemptFigures:
    """attempt_hourly's columns, shared with attempt_hourly_shards."""

    hour: Mapped[datetime] = mapped_column(primary_key=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    outcome: Mapped[str] = mapped_column(String(16), primary_key=True)
    # The HTTP status as text, "none" when no answer came.
    status_code: Mapped[str] = mapped_column(String(8), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer)
    latency_ms_sum: Mapped[int] = mapped_column(BigInteger)
    le_0: Mapped[int] = mapped_column(Integer)
    le_1: Mapped[int] = mapped_column(Integer)
    le_2: Mapped[int] = mapped_column(Integer)
    le_3: Mapped[int] = mapped_column(Integer)
    le_4: Mapped[int] = mapped_column(Integer)
    le_5: Mapped[int] = mapped_column(Integer)
    le_6: Mapped[int] = mapped_column(Integer)
    le_7: Mapped[int] = mapped_column(Integer)
    le_8: Mapped[int] = mapped_column(Integer)
    le_9: Mapped[int] = mapped_column(Integer)
    le_10: Mapped[int] = mapped_column(Integer)
    le_11: Mapped[int] = mapped_column(Integer)


class _WebhookFigures:
    """webhook_hourly's columns, shared with webhook_hourly_shards."""

    hour: Mapped[datetime] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(16), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)


class UsageHourly(_UsageFigures, Base):
    """What the jobs that ended in one hour (UTC) came to, per key, model, final status and
    whether a cost was recorded, once the hour is over: folded in from usage_hourly_shards,
    where each job's end adds to it in the transaction that ends the job, so that reports
    and /metrics add up hours, never jobs, and keep their figures after the jobs are
    deleted by retention. Kept forever. (Processes of the release before the shards add to
    it directly.)"""

    __tablename__ = "usage_hourly"
    # A key's own report reads its hours only.
    __table_args__ = (Index("ix_usage_hourly_key_hour", "api_key_id", "hour"),)


class AttemptHourly(_AttemptFigures, Base):
    """The upstream calls recorded in one hour, per key, model, outcome and HTTP status, with
    their latency histogram (le_N: calls at most LATENCY_BUCKETS_MS[N] long, so cumulative
    and additive across rows), once the hour is over (see UsageHourly)."""

    __tablename__ = "attempt_hourly"


class WebhookHourly(_WebhookFigures, Base):
    """Webhook figures of one hour: attempts by outcome (kind "attempt") and deliveries
    settled by status (kind "delivery"), once the hour is over (see UsageHourly)."""

    __tablename__ = "webhook_hourly"


# The hours being written. Each recording adds to one of ROLLUP_SHARDS rows of its hour
# (promptq.rollups), picked at random, so that concurrent recordings of one key and model
# (and all webhook attempts, whatever their key) seldom wait on one row's lock; each
# sweeper pass folds the hours that are over into the tables above (promptq.rollups.folding),
# so these hold a few hours and readers add up one row an hour of history. Readers read
# both (promptq.rollups.reading).
def _shard() -> Mapped[int]:
    # Last, after the columns of the mixin: the primary key leads with the hour, which the
    # fold reads by.
    return mapped_column(SmallInteger, primary_key=True, sort_order=1)


class UsageHourlyShard(_UsageFigures, Base):
    __tablename__ = "usage_hourly_shards"
    shard: Mapped[int] = _shard()


class AttemptHourlyShard(_AttemptFigures, Base):
    __tablename__ = "attempt_hourly_shards"
    shard: Mapped[int] = _shard()


class WebhookHourlyShard(_WebhookFigures, Base):
    __tablename__ = "webhook_hourly_shards"
    shard: Mapped[int] = _shard()


# A key's spend in a period (a usage report) sums cost_total over its jobs finished in that
# period; with cost_total in the index it is read from the index alone.
Index("ix_jobs_key_finished", Job.api_key_id, Job.finished_at, Job.cost_total)
