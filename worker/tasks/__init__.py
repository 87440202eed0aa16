"""Celery tasks. Each takes ids, loads what it needs, and returns quietly when it is gone."""

from worker import lifecycle
from worker.tasks import batches, jobs, sweeper, webhooks

__all__ = ["batches", "jobs", "lifecycle", "sweeper", "webhooks"]
