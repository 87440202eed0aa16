"""The job object as the API, the CLI and webhooks show it."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from promptq.models import Job, JobStatus
from promptq.pricing import Cost
from promptq.usage import Usage


def isoformat(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def job_usage(job: Job) -> Usage | None:
    if job.input_tokens is None:
        return None
    return Usage(
        input_tokens=job.input_tokens or 0,
        output_tokens=job.output_tokens or 0,
        cache_creation_input_tokens=job.cache_creation_input_tokens or 0,
        cache_read_input_tokens=job.cache_read_input_tokens or 0,
    )


def job_cost(job: Job) -> Cost | None:
    if job.cost_total is None:
        return None
    return Cost(
        input=job.cost_input or Decimal(0),
        output=job.cost_output or Decimal(0),
        cache_write=job.cost_cache_write or Decimal(0),
        cache_read=job.cost_cache_read or Decimal(0),
    )


def job_to_api(job: Job) -> dict[str, Any]:
    usage = job_usage(job)
    cost = job_cost(job)
    error = None
    if job.error_type is not None:
        error = {
            "type": job.error_type,
            "message": job.error_message,
            "upstream_status": job.upstream_status,
        }
    webhook = None
    if job.webhook_url:
        webhook = {
            "url": job.webhook_url,
            "status": job.webhook_status,
            "attempts": job.webhook_attempts or 0,
        }
    return {
        "id": job.id,
        "object": "job",
        "status": job.status,
        "model": job.model,
        "request": job.request,
        "metadata": job.metadata_,
        "priority": job.priority,
        "attempts": job.attempts,
        "created_at": isoformat(job.created_at),
        "started_at": isoformat(job.started_at),
        "finished_at": isoformat(job.finished_at),
        "waiting_for": None if JobStatus(job.status).is_final else job.waiting_for,
        "next_attempt_at": (
            None if JobStatus(job.status).is_final else isoformat(job.next_attempt_at)
        ),
        "result": job.result,
        "output_text": job.output_text,
        "usage": usage.to_api() if usage else None,
        "cost": cost.to_api() if cost else None,
        "prices": job.prices,
        "error": error,
        "webhook": webhook,
        "batch": {"id": job.batch_id, "custom_id": job.custom_id} if job.batch_id else None,
        "anthropic_beta": job.anthropic_beta,
    }
