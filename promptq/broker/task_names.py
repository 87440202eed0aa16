"""Every task's name, written once: `promptq_task` registers each task under its name,
promptq.broker.publish sends messages to it and the beat schedule (promptq.broker.celery_app)
runs it by it.

The names are stable: a message in the broker names its task, so renaming one would strand
the messages a release before it published (and Flower shows them)."""

from __future__ import annotations

RUN_JOB = "promptq.run_job"
FEED_BATCH = "promptq.feed_batch"
DELIVER_WEBHOOK = "promptq.deliver_webhook"
SWEEP = "promptq.sweep"
PRUNE = "promptq.prune"
