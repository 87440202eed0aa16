"""Word of changed keys between processes, over Redis pub/sub: a key revoked or updated is
dropped at once from every API process's cache of checked keys."""

from __future__ import annotations

import logging

import redis

from promptq.redis_keys import KEY_CHANGED_CHANNEL

log = logging.getLogger(__name__)


def announce_key_change(client: redis.Redis, key_id: str) -> bool:
    """Tell every API process to forget the key now; False when Redis could not be told
    (API processes then forget it within their key cache's few seconds)."""
    try:
        client.publish(KEY_CHANGED_CHANNEL, key_id)
    except redis.RedisError:
        log.warning("could not announce the change of key %s", key_id)
        return False
    return True
