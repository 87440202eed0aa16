"""All queries on jobs and their attempts."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    ColumnClause,
    Insert,
    Select,
    Update,
    and_,
    bindparam,
    exists,
    insert,
    literal,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session

from promptq.models import (
    RUNNABLE_STATUSES,
    ApiKey,
    Attempt,
    Job,
    JobStatus,
    WebhookSubscription,
    has_status,
    is_active_job,
)

NO_BATCH = "none"
# What a job of a key with an rpm waits for when its place in the key's rate is ahead.
KEY_RPM = "key_rpm"


@dataclass(frozen=True)
class WrittenJob:
    """A job as a write would leave it (JobRepository.as_written), and its key's standing."""

    job: Job
    webhook_secret: str
    key_revoked: bool


class JobRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add_all(self, jobs: Sequence[Job]) -> None:
        """Insert new jobs' rows in one statement, as Core on the session's connection: the
        ORM's unit of work (flush, identity map, change tracking) cost more of the API's CPU
        per job than the insert itself, and nothing in the rest of the transaction changes
        the jobs. Each object is given the defaults its row gets and stays out of the
        session: what the caller reads of it is what was written."""
        rows = [_job_row(job) for job in jobs]
        if len(rows) > 1:
            # One statement for all (SQLAlchemy's "insertmanyvalues" on PostgreSQL) wants
            # the same columns in every row; a column one job leaves out is NULL in its row
            # either way.
            columns = {column for row in rows for column in row}
            rows = [{column: row.get(column) for column in columns} for row in rows]
        if rows:
            self.session.connection().execute(
                _insert_job_statement(), rows[0] if len(rows) == 1 else rows
            )

    def get(self, job_id: str) -> Job | None:
        return self.session.get(Job, job_id)

    def as_written(self, job_id: str, values: dict[str, Any]) -> WrittenJob | None:
        """The job as writing `values` (column: value) to its row would leave it, not
        written, with what its key signs and sends it by: its row read in one statement and
        made a job out of any session (as_written_from)."""
        query = (
            select(*Job.__table__.c, ApiKey.webhook_secret, ApiKey.revoked_at)
            .join(ApiKey, Job.api_key_id == ApiKey.id)
            .where(Job.id == job_id)
        )
        row = self.session.execute(query).mappings().first()
        if row is None:
            return None
        job = self.as_written_from(row, values)
        return WrittenJob(job, row["webhook_secret"], row["revoked_at"] is not None)

    @staticmethod
    def as_written_from(row: Mapping[Any, Any], values: dict[str, Any]) -> Job:
        """The job `row` (column: value, every column) becomes once `values` are written,
        a new object in no session: from the row its claim returned (claim_ready), the
        job being the worker's while it holds the claim, or from as_written's read."""
        return Job(
            **{
                attribute: values[column] if column in values else row[column]
                for attribute, column in _job_columns()
            }
        )

    def many(self, job_ids: Sequence[str]) -> Sequence[Job]:
        """The jobs of these ids that exist (by primary key; callers keep lists short)."""
        return self.session.scalars(select(Job).where(Job.id.in_(job_ids))).all()

    def with_key(self, job_id: str) -> tuple[Job, ApiKey] | None:
        query = (
            select(Job, ApiKey).join(ApiKey, Job.api_key_id == ApiKey.id).where(Job.id == job_id)
        )
        row = self.session.execute(query).first()
        return (row[0], row[1]) if row else None

    def get_for_key(self, job_id: str, api_key_id: str) -> Job | None:
        query = select(Job).where(Job.id == job_id, Job.api_key_id == api_key_id)
        return self.session.scalars(query).first()

    def by_idempotency_key(self, api_key_id: str, idempotency_key: str) -> Job | None:
        query = select(Job).where(
            Job.api_key_id == api_key_id, Job.idempotency_key == idempotency_key
        )
        return self.session.scalars(query).first()

    def by_idempotency_keys(self, pairs: Collection[tuple[str, str]]) -> dict[tuple[str, str], Job]:
        """The jobs of many (api key id, idempotency key) pairs in one statement, by pair:
        the unique index on the two answers it, however many jobs the keys have."""
        if not pairs:
            return {}
        query = select(Job).where(tuple_(Job.api_key_id, Job.idempotency_key).in_(list(pairs)))
        return {
            (job.api_key_id, job.idempotency_key): job
            for job in self.session.scalars(query)
            if job.idempotency_key is not None
        }

    def list_for_key(
        self,
        api_key_id: str,
        status: str | None,
        limit: int,
        before_id: str | None,
        batch: str | None = None,
    ) -> Sequence[Job]:
        """Newest first; ids are ULIDs, so ordering by id is ordering by creation. `batch`:
        a batch's id, or NO_BATCH for jobs outside any batch."""
        query = _filtered(select(Job).where(Job.api_key_id == api_key_id), status, batch)
        if before_id is not None:
            query = query.where(Job.id < before_id)
        return self.session.scalars(query.order_by(Job.id.desc()).limit(limit)).all()

    def list_finished_for_key(
        self,
        api_key_id: str,
        status: str | None,
        limit: int,
        before: tuple[datetime, str] | None,
        batch: str | None = None,
    ) -> Sequence[Job]:
        """Finished jobs, the most recently finished first; `before` is the (finished_at,
        id) of the previous page's last job. The id breaks ties between jobs that finished
        in the same microsecond, so no job is skipped or listed twice across pages."""
        query = _filtered(
            select(Job).where(Job.api_key_id == api_key_id, Job.finished_at.is_not(None)),
            status,
            batch,
        )
        if before is not None:
            finished_at, job_id = before
            query = query.where(
                or_(
                    Job.finished_at < finished_at,
                    and_(Job.finished_at == finished_at, Job.id < job_id),
                )
            )
        order = (Job.finished_at.desc(), Job.id.desc())
        return self.session.scalars(query.order_by(*order).limit(limit)).all()

    def claim(self, job_id: str, now: datetime, lease_until: datetime) -> bool:
        """Compare-and-set a runnable, due job to running. Only one caller ever wins, which
        is what makes a message delivered twice harmless."""
        result = self.session.execute(_claim_statement(), _claim_params(job_id, now, lease_until))
        return result.rowcount == 1  # type: ignore[attr-defined]

    def claim_ready(self, job_id: str, now: datetime, lease_until: datetime) -> Any:
        """claim() and the read that comes before it, in one statement: the job claimed only
        when nothing has to be decided first (its key not revoked, no place in its key's
        rpm to take), with what running it needs of the job and of its key (whether it has
        a webhook subscription in force included); None when it was not claimed, for
        whatever reason (the caller finds out which the long way)."""
        # On the session's connection, as Core: there is no object of this session to
        # keep in step, and the ORM's bulk-update machinery cost more CPU than the rest of
        # the claim.
        connection = self.session.connection()
        return connection.execute(
            _claim_ready_statement(), _claim_params(job_id, now, lease_until)
        ).first()

    def transition(self, job_id: str, from_statuses: Sequence[str], values: dict[str, Any]) -> bool:
        """Compare-and-set from one of `from_statuses`; False when the job had moved on."""
        statement = (
            update(Job)
            .where(Job.id == job_id, Job.status.in_(from_statuses))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return self.session.execute(statement).rowcount == 1  # type: ignore[attr-defined]

    def end_runnable_of_key(
        self, api_key_id: str, values: dict[str, Any]
    ) -> list[tuple[str, str | None]]:
        """Finish every job of the key that has not started (its revocation); the (model,
        batch id) of each job so ended, for the rollups and the batches' counts."""
        statement = (
            update(Job)
            .where(Job.api_key_id == api_key_id, Job.status.in_(RUNNABLE_STATUSES))
            # The caller counts them, in this transaction.
            .values(**values, accounted=1)
            .returning(Job.model, Job.batch_id)
            .execution_options(synchronize_session=False)
        )
        return [(row[0], row[1]) for row in self.session.execute(statement)]

    def insert_attempt(self, values: dict[str, Any]) -> None:
        """An attempt's row, written at once (no ORM object to flush later)."""
        self.session.execute(insert(Attempt).values(**values))

    def settle(
        self, job_id: str, from_statuses: Sequence[str], values: dict[str, Any]
    ) -> tuple[bool, bool]:
        """transition(), also saying whether the job's key has a webhook subscription in
        force: (settled, subscribed). Asked in the same statement, so that a job without
        one pays nothing to learn it."""
        statement = (
            update(Job)
            .where(Job.id == job_id, Job.status.in_(from_statuses))
            .values(**values)
            .returning(subscribed_of_job())
            .execution_options(synchronize_session=False)
        )
        row = self.session.execute(statement).first()
        return (row is not None, bool(row[0]) if row is not None else False)

    def attempts_for(self, job_id: str) -> Sequence[Attempt]:
        query = select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)
        return self.session.scalars(query).all()

    def due_for_publish(
        self,
        now: datetime,
        stale_before: datetime,
        limit: int,
        after_id: str | None = None,
        up_to_id: str | None = None,
    ) -> Sequence[Job]:
        """Runnable jobs that are due (parked until a time now past), or were last touched
        before `stale_before`: their broker message may be lost (a wiped Redis, a dead
        worker's prefetch), or was never sent (a wait too long for a broker countdown).
        A page in id order within (after_id, up_to_id], walked through the partial index of
        active jobs."""
        query = (
            select(Job)
            .where(
                is_active_job(),
                has_status(*RUNNABLE_STATUSES),
                or_(
                    Job.next_attempt_at <= now,
                    Job.next_attempt_at.is_(None) & (Job.updated_at < stale_before),
                ),
            )
            .order_by(Job.id)
            .limit(limit)
        )
        if after_id is not None:
            query = query.where(Job.id > after_id)
        if up_to_id is not None:
            query = query.where(Job.id <= up_to_id)
        return self.session.scalars(query).all()

    def expired_leases(self, now: datetime, limit: int) -> Sequence[Job]:
        query = (
            select(Job)
            .where(is_active_job(), has_status(JobStatus.RUNNING), Job.lease_expires_at < now)
            .order_by(Job.id)
            .limit(limit)
        )
        return self.session.scalars(query).all()

    def live_leases(self, model: str, now: datetime) -> list[tuple[str, datetime]]:
        """The model's running jobs whose claim is still held, with its end: the calls in
        flight, as the rate limiter rebuilds its slots from them."""
        query = select(Job.id, Job.lease_expires_at).where(
            is_active_job(),
            has_status(JobStatus.RUNNING),
            Job.model == model,
            Job.lease_expires_at > now,
        )
        return [(job_id, until) for job_id, until in self.session.execute(query) if until]

    def extend_leases(self, job_ids: Sequence[str], lease_until: datetime) -> int:
        if not job_ids:
            return 0
        statement = (
            update(Job)
            .where(Job.id.in_(job_ids), Job.status == JobStatus.RUNNING)
            .values(lease_expires_at=lease_until)
            .execution_options(synchronize_session=False)
        )
        return self.session.execute(statement).rowcount  # type: ignore[attr-defined]


# The job's key, spelled with its table, for the subqueries of a statement on jobs: in an
# UPDATE (its WHERE and RETURNING), SQLAlchemy's SQLite compiler drops table names, and
# SQLite reads a bare `api_key_id` inside a subquery as the subquery's own column when it
# has one (`api_key_id = api_key_id` was true whenever any key had a subscription).
JOB_KEY: ColumnClause[Any] = literal_column("jobs.api_key_id")


def subscribed_of_job() -> Any:
    """Whether the job's key has a webhook subscription in force (a term of a statement on
    jobs)."""
    return (
        select(literal_column("1"))
        .select_from(WebhookSubscription)
        .where(
            literal_column("webhook_subscriptions.api_key_id") == JOB_KEY,
            WebhookSubscription.disabled_at.is_(None),
        )
        .exists()
    )


def revoked_of_job() -> Any:
    """Whether the job's key has been revoked (a term of a statement on jobs)."""
    return (
        select(literal_column("1"))
        .select_from(ApiKey)
        .where(literal_column("api_keys.id") == JOB_KEY, ApiKey.revoked_at.is_not(None))
        .exists()
    )


@lru_cache(maxsize=1)
def _job_columns() -> tuple[tuple[str, str], ...]:
    """(attribute, column) of every column of a job's row: `metadata_` is `metadata`."""
    return tuple((prop.key, prop.columns[0].key) for prop in sa_inspect(Job).column_attrs)


@lru_cache(maxsize=1)
def _job_defaults() -> tuple[tuple[str, Any], ...]:
    """(attribute, its column's default) of the columns that have one (promptq.models.Job:
    a constant, or a function such as the clock's, which SQLAlchemy wraps to take the
    execution's context)."""
    return tuple(
        (prop.key, prop.columns[0].default)
        for prop in sa_inspect(Job).column_attrs
        if prop.columns[0].default is not None
    )


def _job_row(job: Job) -> dict[str, Any]:
    """A new job's row (column: value) with its columns' defaults set on the job itself."""
    for attribute, default in _job_defaults():
        if getattr(job, attribute) is None:
            # Core would write the None given: the column's default is set here.
            setattr(job, attribute, default.arg(None) if default.is_callable else default.arg)
    # Only the columns given a value: the rest of a new job's row is NULL anyway, and each
    # parameter is one more to convert and send.
    return {
        column: value
        for attribute, column in _job_columns()
        if (value := getattr(job, attribute)) is not None
    }


@lru_cache(maxsize=1)
def _insert_job_statement() -> Insert:
    return insert(Job)


def _claim_params(job_id: str, now: datetime, lease_until: datetime) -> dict[str, Any]:
    return {"claim_job_id": job_id, "claim_now": now, "claim_lease_until": lease_until}


# The claims are built once, every value a bound parameter (_claim_params): building and
# compiling them per job was a tenth of a worker's CPU.
@lru_cache(maxsize=1)
def _claim_statement() -> Update:
    """The job from runnable and due to running, one attempt more, leased until
    `claim_lease_until`."""
    now = bindparam("claim_now", type_=Job.__table__.c.started_at.type)
    return (
        update(Job)
        .where(
            Job.id == bindparam("claim_job_id"),
            # A bound parameter each, not one list: a list is "expanding", and SQLAlchemy
            # would render the statement's text again on every execution.
            Job.status.in_([literal(status) for status in RUNNABLE_STATUSES]),
            or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now),
        )
        .values(
            status=JobStatus.RUNNING,
            attempts=Job.attempts + 1,
            started_at=now,
            lease_expires_at=bindparam(
                "claim_lease_until", type_=Job.__table__.c.lease_expires_at.type
            ),
            waiting_for=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )


@lru_cache(maxsize=1)
def _claim_ready_statement() -> Update:
    """JobRepository.claim_ready's statement. Subqueries rather than UPDATE ... FROM:
    SQLite's RETURNING may not name a FROM table."""
    of_key = literal_column("api_keys.id") == JOB_KEY
    key_ready = exists().where(
        of_key,
        ApiKey.revoked_at.is_(None),
        or_(ApiKey.rpm.is_(None), Job.attempts > 0, Job.waiting_for == KEY_RPM),
    )
    return (
        _claim_statement()
        .where(key_ready)
        .returning(
            *(Job.__table__.c[column] for column in CLAIM_COLUMNS),
            select(ApiKey.monthly_budget_usd).where(of_key).scalar_subquery(),
            select(ApiKey.quotas).where(of_key).scalar_subquery(),
            subscribed_of_job(),
            select(ApiKey.webhook_secret).where(of_key).scalar_subquery(),
            # The rest of the row as claimed (CLAIMED_ROW_COLUMNS): what the event of the
            # job's end shows, built without reading the job again (promptq.jobs.execution).
            *(Job.__table__.c[column] for column in CLAIMED_ROW_COLUMNS),
        )
    )


# What claim_ready returns of the job's row first, what running it needs; then four of its
# key's (budget, quotas, a subscription in force, webhook signing secret); then the rest of
# the row (CLAIMED_ROW_COLUMNS), most of it NULL until the job ends and next to nothing to
# return.
CLAIM_COLUMNS = (
    "id",
    "api_key_id",
    "model",
    "request",
    "priority",
    "attempts",
    "anthropic_beta",
    "batch_id",
    "webhook_url",
)
CLAIMED_ROW_COLUMNS = tuple(
    column.key for column in Job.__table__.c if column.key not in CLAIM_COLUMNS
)


def _filtered(query: Select[Job], status: str | None, batch: str | None) -> Select[Job]:
    """A job list's filters: its status, and its batch (NO_BATCH: jobs outside any)."""
    if status is not None:
        query = query.where(Job.status == status)
    if batch == NO_BATCH:
        return query.where(Job.batch_id.is_(None))
    if batch is not None:
        return query.where(Job.batch_id == batch)
    return query
