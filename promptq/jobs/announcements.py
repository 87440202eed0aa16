"""Word that a job has finished, over Redis pub/sub, so that a client held open on it
(POST /v1/messages, POST /v1/jobs?wait=N) is answered at once rather than at its next look
at the database. Only a hint: a lost message costs a waiter one polling interval, never its
answer, so publishing never fails a job.
"""

from __future__ import annotations

import logging

import redis

from promptq.redis_keys import JOB_FINISHED_CHANNEL

log = logging.getLogger(__name__)


def announce(client: redis.Redis, job_id: str) -> None:
    try:
        client.publish(JOB_FINISHED_CHANNEL, job_id)
    except redis.RedisError:
        log.debug("could not announce the end of job %s", job_id, extra={"job_id": job_id})
