"""Running one job: the Celery edge of promptq.jobs.runner."""

from __future__ import annotations

from typing import Any

from promptq.ratelimit.limiter import Grant
from worker.context import worker_context
from worker.tasks.base import promptq_task


@promptq_task("run_job")
def run_job(job_id: str, grant: dict[str, Any] | None = None) -> str:
    """`grant` is set when a dispatcher already took rate-limit budget for this job."""
    return worker_context().runner.run(job_id, Grant.from_message(grant) if grant else None)
