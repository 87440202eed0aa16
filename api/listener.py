"""The API's ear: one Redis subscription per process, for finished jobs (the requests held
open on a job, POST /v1/messages and ?wait=N, are woken when theirs ends) and for revoked
or changed keys (the process forgets them at once, not after its key cache's few seconds).

Waiters still read the job from the database, which stays the only truth; the wake-up only
saves them from polling it every fraction of a second. While the subscription is down
(Redis restarting), they poll at the old, faster pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any, cast

import redis
import redis.asyncio.client

from promptq.redis_keys import JOB_FINISHED_CHANNEL, KEY_CHANGED_CHANNEL
from promptq.redis_roles import async_redis_client

log = logging.getLogger(__name__)

# How often a waiter looks at the database with no word from Redis: rarely while the
# subscription is up (the word normally comes first), often while it is down.
POLL_SUBSCRIBED_SECONDS = 2.0
POLL_UNSUBSCRIBED_SECONDS = 0.25
RECONNECT_SECONDS = 1.0
# How long shutting down waits for the subscription to close.
STOP_SECONDS = 2.0
# One wait for the next message; an empty answer well before it ends is a dead connection
# (see _next_message).
LISTEN_SECONDS = 5.0


class SubscriptionLost(redis.ConnectionError):
    pass


class Watch:
    """One waiter's view of one job."""

    def __init__(self, listener: FinishedJobs) -> None:
        self.event = asyncio.Event()
        self.listener = listener
        self.looked_at = time.monotonic()

    async def pause(self, seconds: float) -> bool:
        """Wait up to `seconds`, less if the job is announced finished or the database is
        due a look meanwhile; whether the caller should look at it now (the wake-up came,
        or the polling interval has passed since its last look)."""
        subscribed = self.listener.subscribed
        interval = POLL_SUBSCRIBED_SECONDS if subscribed else POLL_UNSUBSCRIBED_SECONDS
        until_due = interval - (time.monotonic() - self.looked_at)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), max(0.0, min(seconds, until_due)))
        look = self.event.is_set() or time.monotonic() - self.looked_at >= interval
        self.event.clear()
        if look:
            self.looked_at = time.monotonic()
        return look


class FinishedJobs:
    def __init__(
        self,
        redis_url: str,
        on_key_changed: Callable[[str], None] = lambda _key_id: None,
        on_hearing: Callable[[bool], None] = lambda _hearing: None,
    ) -> None:
        """`redis_url`: the events' Redis (PROMPTQ_EVENTS_REDIS_URL, else PROMPTQ_REDIS_URL).
        `on_key_changed(key_id)` for every key revoked or updated; `on_hearing(bool)`
        when the subscription comes up or goes down (a change may be missed while down)."""
        self.redis_url = redis_url
        self.on_key_changed = on_key_changed
        self.on_hearing = on_hearing
        self.subscribed = False
        self._watches: dict[str, set[Watch]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._listen())

    async def stop(self) -> None:
        """Cancel the subscription and wait for it a bounded time: a cancel that lands while
        redis-py is still connecting can be lost (about one start-and-stop in a hundred
        here), and the process's shutdown must not hang on it."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=STOP_SECONDS)
            if not done:
                log.warning("the finished-jobs subscription did not close; left behind")

    @contextlib.contextmanager
    def watching(self, job_id: str) -> Iterator[Watch]:
        """Registered before the caller first reads the job, so an end announced between
        that read and the first pause is not missed."""
        watch = Watch(self)
        self._watches[job_id].add(watch)
        try:
            yield watch
        finally:
            watches = self._watches.get(job_id)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watches[job_id]

    async def _listen(self) -> None:
        while not self._stopping:
            client = async_redis_client(self.redis_url)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(JOB_FINISHED_CHANNEL, KEY_CHANGED_CHANNEL)
                    self.subscribed = True
                    self.on_hearing(True)
                    while True:
                        message = await _next_message(pubsub)
                        if message is None or message.get("type") != "message":
                            continue
                        if message["channel"] == KEY_CHANGED_CHANNEL.encode():
                            self.on_key_changed(message["data"].decode())
                        else:
                            self._wake(message["data"].decode())
            except (redis.RedisError, OSError):
                log.warning("lost the Redis subscription; waiters poll until it is back")
            finally:
                self.subscribed = False
                self.on_hearing(False)
                await client.aclose()
            if not self._stopping:
                await asyncio.sleep(RECONNECT_SECONDS)

    def _wake(self, job_id: str) -> None:
        for watch in self._watches.get(job_id, ()):
            watch.event.set()


async def _next_message(pubsub: redis.asyncio.client.PubSub) -> dict[str, Any] | None:
    """The next message, or None when none came within LISTEN_SECONDS; SubscriptionLost
    when the connection is dead.

    Not redis-py's `listen()`: when the kernel ends the connection with ETIMEDOUT (its
    keepalives unanswered, 45 s after the last packet by redis-py's defaults: a network
    partition, a Redis host gone), Python 3.11+ raises that OSError as TimeoutError, which
    is asyncio.TimeoutError, and redis-py takes it for the end of a wait the caller asked
    for: every read returns None at once, forever. `listen()` then loops without ever
    yielding, and the API process's event loop spins at full CPU and answers nothing again
    (seen in tests/stack/test_partition.py: an API cut from Redis for 40 s never answered
    after the heal). A wait of our own that ends empty long before its time is that dead
    connection, and the listener starts over."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    message = await pubsub.get_message(timeout=LISTEN_SECONDS)
    if message is None and loop.time() - started < LISTEN_SECONDS / 2:
        raise SubscriptionLost("the subscription's connection is gone")
    return cast("dict[str, Any] | None", message)
