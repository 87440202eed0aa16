"""What a job's end sets off, wherever it ends (its attempt recorded, the sweeper taking it
back for good, its budget refusing it): its webhook deliveries and, for a batch's request
that was the batch's last, the batch's end; and its hour's usage rollup. What is to be
sent (the word to clients held open on the job, the deliveries) goes once the transaction
commits (promptq.outbox)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from promptq import outbox
from promptq.batches.service import request_ended
from promptq.config import Settings
from promptq.models import Job
from promptq.rollups import job_ended
from promptq.webhooks import deliveries


def end_events(session: Session, settings: Settings, job: Job) -> None:
    outbox.announce_finished(session, job.id)
    deliveries.job_event(session, job)
    if job.batch_id is not None:
        request_ended(session, settings, job)
    job_ended(session, job)
