"""Every name promptq gives a Redis key or pub/sub channel, in one place: what shares the
Redis with promptq (Celery's queues, another application) can be told apart at a glance,
and no two parts of promptq can pick the same name for different things.

Keys built from a model or a client key put that part in braces (a hash tag): one model's,
or one key's, keys then sit on one slot, should the Redis be a cluster, as the Lua scripts
that take several of them at once require.
"""

from __future__ import annotations

# --- The limiter (promptq.ratelimit) --------------------------------------------------------
# The models whose queues hold waiting jobs, for the dispatchers.
MODELS_WAITING = "promptq:rl:waiting-models"
# What `promptq limits` scans for to list the models the limiter knows.
_MODEL_STATE_PREFIX = "promptq:rl:{"
MODEL_STATE_PATTERN = "promptq:rl:{*}:state"


def model_limiter_base(model: str) -> str:
    """The prefix of one model's limiter keys (`:state`, `:inflight`, `:waiting`, ...)."""
    return f"promptq:rl:{{{model}}}"


def model_of_state_key(key: str) -> str:
    """The model a key matching MODEL_STATE_PATTERN belongs to."""
    return key[len(_MODEL_STATE_PREFIX) : key.rindex("}")]


def cache_marker(model: str, digest: str) -> str:
    """Says the upstream holds a prompt prefix (by its digest) of the model in its cache."""
    return f"{model_limiter_base(model)}:cached:{digest}"


def key_rate(key_id: str) -> str:
    """The GCRA meter of one client key's rpm for its jobs reaching the upstream."""
    return f"promptq:rl:key:{{{key_id}}}"


def quota(name: str, key_id: str) -> str:
    """One client key's intake quota `name` (requests a second, redeliveries a minute)."""
    return f"promptq:quota:{name}:{{{key_id}}}"


def unfinished_jobs(key_id: str) -> str:
    """Intake's count of one client key's unfinished jobs, never below their number
    (promptq.quotas)."""
    return f"promptq:quota:unfinished:{{{key_id}}}"


# --- The broker and the sweeper -------------------------------------------------------------
def published_marker(job_id: str) -> str:
    """While it lives, the sweeper takes the job's broker message for alive."""
    return f"promptq:published:{job_id}"


# Webhook deliveries to send now, by id: pushed after the commit that made them due (and by
# the sweeper for those whose id was lost), popped by the delivery loops of the worker
# processes (worker.deliveries). Only a hint: the delivery's row says whether it is due.
DELIVERY_QUEUE = "promptq:webhooks:due"

# Where the sweeper's next pass over stale jobs starts, shared by every worker that sweeps:
# only a hint (lost with a wiped Redis, the next pass starts from the first job). And the
# lock held while a pass runs, so that two never run at once.
SWEEP_CURSOR = "promptq:sweep:cursor"
SWEEP_LOCK = "promptq:sweep:running"

# --- Pub/sub channels -----------------------------------------------------------------------
# A job has finished: clients held open on it are answered at once.
JOB_FINISHED_CHANNEL = "promptq:jobs:finished"
# A key was revoked or updated: every API process drops it from its cache.
KEY_CHANGED_CHANNEL = "promptq:keys:changed"

# --- The dashboard --------------------------------------------------------------------------
DASHBOARD_SESSION_PREFIX = "promptq:dashboard:session:"
DASHBOARD_FAILED_SIGN_INS_PREFIX = "promptq:dashboard:failed-sign-ins:"
