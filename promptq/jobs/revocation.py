"""Revoking a client key ends everything it set going, in the transaction that revokes it:
its jobs not yet started are canceled, its unfinished batches are canceled (`canceling`,
then `ended` once their running requests finish), its webhook subscriptions are disabled and
its deliveries still to be sent are stopped. Calls already at the upstream finish: they are
paid for. After the commit, every API process is told to forget the key at once
(`promptq.keys.channels.announce_key_change`), and a worker refuses to start any job of a
revoked key.

In promptq.jobs rather than promptq.keys: it ends jobs, batches and deliveries, so it sits
above them, while the keys themselves (promptq.keys) sit below everything that checks one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlalchemy.orm import Session

from promptq.batches.repository import BatchRepository
from promptq.batches.service import end_if_finished
from promptq.clock import utcnow
from promptq.config import Settings
from promptq.jobs.execution import revoked_key_values
from promptq.jobs.repository import JobRepository
from promptq.keys.service import find_key
from promptq.models import ApiKey, BatchStatus, JobStatus
from promptq.rollups import EndedJob, jobs_ended
from promptq.webhooks import deliveries, subscriptions


@dataclass(frozen=True)
class Revocation:
    key: ApiKey
    jobs_canceled: int
    batches_canceled: int
    subscriptions_disabled: int
    deliveries_stopped: int


def revoke(session: Session, settings: Settings, ident: str) -> Revocation:
    """Revoke the key named by id or name, and end what it set going. Revoking a key again
    ends whatever was left (a job submitted in the moment before)."""
    key = find_key(session, ident)
    now = utcnow()
    if key.revoked_at is None:
        key.revoked_at = now
    session.flush()
    ended = JobRepository(session).end_runnable_of_key(key.id, revoked_key_values(now))
    # Counted as they end, as every job's end is: the hour's rollup and its batch's counts.
    jobs_ended(session, [EndedJob(key.id, model, JobStatus.CANCELED, now) for model, _ in ended])
    batches = BatchRepository(session)
    for batch_id, count in Counter(b for _, b in ended if b is not None).items():
        batches.count_ended(batch_id, {"canceled": count})
    # First, so that the batches ended below announce their end to nobody.
    disabled = subscriptions.disable_all_of_key(
        session, key.id, f"the API key was revoked on {now.date().isoformat()}"
    )
    unfinished = batches.unfinished_of_key(key.id)
    for batch_id in unfinished:
        batch = batches.lock(batch_id)
        if batch is not None and batch.processing_status == BatchStatus.IN_PROGRESS:
            batch.processing_status = BatchStatus.CANCELING
            batch.cancel_initiated_at = now
        session.flush()
        end_if_finished(session, settings, batch_id)
    stopped = deliveries.stop_pending_of_key(session, key.id)
    return Revocation(key, len(ended), len(unfinished), disabled, stopped)
