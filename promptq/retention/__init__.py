"""Retention: finished jobs older than PROMPTQ_RETENTION_DAYS leave the database, with their
attempts, deliveries and reservations; money stays in the ledger and the rollups."""

from promptq.retention.service import PruneReport, eligible_jobs, prune

__all__ = ["PruneReport", "eligible_jobs", "prune"]
