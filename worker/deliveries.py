"""Webhook deliveries' own consumer and threads in a worker process.

Deliveries never wait behind jobs. Their ids come on a Redis list of their own
(promptq.broker.publish.publish_deliveries), not through Celery: a loop here pops one only
when one of the pool's threads is free, so ids stay in Redis for another worker while this
one is busy, and a delivery published while every job thread waits on the upstream starts
at once. (A Celery message would wait for a free job slot, and Celery's Redis transport
reads the job queues before the webhook queue.)

A delivery waits on somebody else's server for up to 15 s; a key whose receivers never
answer would otherwise hold every thread of the pool. So the pool has a fixed number of
threads (PROMPTQ_WEBHOOK_CONCURRENCY), of which one key's POSTs may hold only a few at once
(PROMPTQ_WEBHOOK_MAX_IN_FLIGHT_PER_KEY). A delivery of a key that has no room waits here, in
a short line of the key's own, for one of its key's POSTs to end; past that line it stays
pending in the database, put behind the other due ones, and the sweeper publishes it again
on a later pass.

Nothing here is the only copy of anything. A popped id is not acknowledged: the
delivery's row is the truth, and the sweeper publishes again any delivery due for a few
seconds (its id lost in a process that died, in a wiped Redis, in a line dropped at
shutdown). The claim is a compare-and-set, so a duplicate id sends nothing, and its lease
(60 s) covers a process that dies mid-send: the delivery becomes due again and is sent once
more, with the same webhook-id, so receivers can tell. A retry due within a minute waits
in this process (after about 5 s, say); a later one is the sweeper's.

The first attempt of the deliveries a job's end creates usually skips all of that: its record
writes them claimed when the pool has room for them (take_room), and hands them over here
once it has committed (hand_over): no round trip through Redis, no claim of their own, and
the POST starts a moment after the job's end.

Plain threads, locks and queues: under gevent's monkey-patching they are greenlets and
cooperative waits, with no change here.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from celery import Celery

from promptq.broker.publish import take_delivery
from promptq.webhooks.deliveries import SENDING_LEASE, PreparedDelivery
from promptq.webhooks.sender import DEFAULT_TIMEOUT_SECONDS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Handed:
    """A delivery its creator wrote claimed and handed over, and when (the pool's clock)."""

    prepared: PreparedDelivery
    at: float


# What the pool sends: the id of a delivery to claim, or a delivery its creator claimed.
Item = str | Handed

# The longest the loop waits on Redis before it looks at its own retries and its stop flag.
POLL_SECONDS = 1.0
# How many deliveries of one key may wait here for the key's room; the rest are postponed
# in the database (the sweeper's). Ids only: a few kilobytes per key at most.
WAITING_PER_KEY = 200
# Deliveries handed over claimed that may wait here for their key's room (take_room): per
# key, and in all; a few kilobytes each, their bodies.
HANDED_PER_KEY = WAITING_PER_KEY
HANDED_IN_ALL = 1000
# How long one may wait before its POST starts: past that its claim's lease could run out
# before its POST ends, and the sweeper send it a second time meanwhile. It is left to the
# sweeper instead, once the lease has run out.
HANDED_MAX_WAIT_SECONDS = SENDING_LEASE.total_seconds() - DEFAULT_TIMEOUT_SECONDS - 5
# A retry further away than this is left to the sweeper (nothing long is held in memory).
MAX_LOCAL_RETRY_SECONDS = 60.0


class DeliverySource(Protocol):
    """Where the ids of deliveries to send now come from."""

    def take(self, timeout: float) -> str | None:
        """The next id, waiting for one up to `timeout` seconds; None when none came."""
        ...


class Sender(Protocol):
    """Sends one delivery: claims it, asks the pool for room for its key, posts, records
    (or has it recorded)."""

    def __call__(self, delivery_id: str, pool: DeliveryPool) -> None: ...

    def send_claimed(self, prepared: PreparedDelivery, pool: DeliveryPool) -> None:
        """Posts and records a delivery claimed by its creator, its key's room taken."""
        ...

    def unclaim(self, delivery_ids: list[str]) -> None:
        """Gives back the claims of deliveries handed over that will not be sent here."""
        ...

    def close(self) -> None:
        """Finishes what the sends so far left to do (their records): the pool has
        stopped sending."""
        ...


class DeliveryPool:
    def __init__(
        self,
        threads: int,
        per_key: int,
        source: DeliverySource,
        send: Sender,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threads = threads
        self.per_key = per_key
        self._source = source
        self._send = send
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="webhook")
        # One per thread: the loop takes one before it pops an id and the thread gives it
        # back when it has nothing more to send.
        self._free = threading.Semaphore(threads)
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        # key -> what waits for its room, oldest first: ids, and deliveries handed over
        self._waiting: dict[str, dict[str, Handed | None]] = {}
        self._ready: list[Item] = []  # waited for room that is now free
        # Handed over, or promised by take_room, and not yet posting: per key, and in all.
        self._handed: Counter[str] = Counter()
        self._retries: list[tuple[float, str]] = []  # (due on the clock, id), a heap
        self._stopping = threading.Event()
        self._loop: threading.Thread | None = None

    # --- the loop --------------------------------------------------------------------------

    def start(self) -> None:
        """Start taking deliveries (the worker process, once ready)."""
        if self._loop is None:
            self._loop = threading.Thread(target=self._run_loop, name="webhook-loop", daemon=True)
            self._loop.start()

    def _run_loop(self) -> None:
        while not self._stopping.is_set():
            if not self._free.acquire(timeout=POLL_SECONDS):
                continue
            try:
                item = self._local_next() or self._take()
            except BaseException:
                self._free.release()
                raise
            if item is None:
                self._free.release()
                continue
            self._dispatch(item)

    def _dispatch(self, item: Item) -> None:
        """Send on a thread of the pool, with the thread's room already taken (and for a
        delivery handed over, its key's)."""
        try:
            self._executor.submit(self._run, item)
        except RuntimeError:
            # Shut down meanwhile: left to the sweeper, pending in the database (a delivery
            # handed over, once its lease runs out).
            self._free.release()
            if isinstance(item, Handed):
                self.release(item.prepared.key_id)

    def _take(self) -> str | None:
        wait = POLL_SECONDS
        with self._lock:
            if self._retries:
                # Never 0, which BRPOP takes for "forever".
                wait = min(wait, max(0.01, self._retries[0][0] - self._clock()))
        try:
            return self._source.take(wait)
        except Exception:
            # Redis away: the ids are lost with it or wait there; the sweeper has the rows.
            log.warning("could not take a webhook delivery; trying again", exc_info=True)
            self._stopping.wait(POLL_SECONDS)
            return None

    def _local_next(self) -> Item | None:
        """A delivery this process holds that may go now: one whose key has room again, or a
        retry that is due."""
        with self._lock:
            if self._ready:
                return self._ready.pop(0)
            if self._retries and self._retries[0][0] <= self._clock():
                return heapq.heappop(self._retries)[1]
        return None

    def _run(self, item: Item | None) -> None:
        # Holds one of the pool's threads, and keeps it for the deliveries its own sends
        # made room for.
        try:
            while item is not None:
                try:
                    if isinstance(item, Handed):
                        self._send_handed(item)
                    else:
                        self._send(item, self)
                except Exception:
                    # Its lease runs out and the sweeper sends it again.
                    log.exception("webhook delivery failed to complete; it will be sent again")
                with self._lock:
                    # Under the lock, as shutdown collects what is left here to give back.
                    stopping = self._stopping.is_set()
                    item = self._ready.pop(0) if self._ready and not stopping else None
        finally:
            self._free.release()

    def _send_handed(self, handed: Handed) -> None:
        if self._clock() - handed.at > HANDED_MAX_WAIT_SECONDS:
            # Its key's room was taken for it: given back unused.
            self.release(handed.prepared.key_id)
            log.warning(
                "webhook delivery %s waited too long here; the sweeper sends it once its "
                "claim's lease runs out",
                handed.prepared.id,
            )
            return
        self._send.send_claimed(handed.prepared, self)

    # --- what a sender asks of the pool ----------------------------------------------------

    def try_reserve(self, key_id: str) -> bool:
        """Room for one more POST of this key, taken now; False when its share is full."""
        with self._lock:
            if self._in_flight[key_id] >= self.per_key:
                return False
            self._in_flight[key_id] += 1
            return True

    def release(self, key_id: str) -> None:
        """A POST of this key ended: the oldest delivery of the key waiting here may go, on a
        free thread at once, else on the next thread to finish."""
        with self._lock:
            self._in_flight[key_id] -= 1
            if self._in_flight[key_id] <= 0:
                del self._in_flight[key_id]
            waiting = self._waiting.get(key_id)
            if not waiting:
                return
            first_id = next(iter(waiting))
            first: Item = waiting.pop(first_id) or first_id
            if not waiting:
                del self._waiting[key_id]
            if isinstance(first, Handed):
                # Claimed already: the room just freed is taken for it here.
                self._in_flight[key_id] += 1
                self._posting_handed(key_id)
            if self._stopping.is_set() or not self._free.acquire(blocking=False):
                self._ready.append(first)
                return
        self._dispatch(first)

    def wait_for_room(self, key_id: str, delivery_id: str) -> bool:
        """Hold a delivery whose key had no room until one of the key's POSTs ends; False
        when the key's line is full (the caller postpones it in the database)."""
        with self._lock:
            if self._stopping.is_set():
                return False
            if self._in_flight[key_id] < self.per_key:
                # Room came between the caller's try and now.
                self._ready.append(delivery_id)
                return True
            waiting = self._waiting.setdefault(key_id, {})
            if delivery_id in waiting:
                return True  # the sweeper published it again meanwhile
            if len(waiting) >= WAITING_PER_KEY:
                return False
            waiting[delivery_id] = None
            return True

    # --- deliveries handed over by the process's jobs (promptq.webhooks.DeliveryRoom) ------

    def take_room(self, key_id: str) -> bool:
        """Whether the pool takes a delivery of this key that its creator claims as it
        writes it, to send at once or, after the key's POSTs in flight, first in the key's
        line. False when the key already has HANDED_PER_KEY waiting so (or the pool
        HANDED_IN_ALL, or it is not running): the delivery is then published as any
        other."""
        with self._lock:
            if self._loop is None or self._stopping.is_set():
                return False
            if self._handed[key_id] >= HANDED_PER_KEY or self._handed.total() >= HANDED_IN_ALL:
                return False
            self._handed[key_id] += 1
            return True

    def give_room_back(self, key_id: str) -> None:
        """What take_room took, for a delivery that was not written after all."""
        with self._lock:
            self._posting_handed(key_id)

    def hand_over(self, prepared: PreparedDelivery) -> None:
        """Send a delivery written claimed: now, on a free thread or the next one to finish,
        when its key has room; otherwise in the key's line once it has."""
        key_id = prepared.key_id
        handed = Handed(prepared, self._clock())
        with self._lock:
            # Under the lock, as shutdown collects what waits here to give back: what comes
            # after that finds the pool stopping.
            stopping = self._stopping.is_set()
            if stopping:
                self._posting_handed(key_id)
            elif self._in_flight[key_id] >= self.per_key:
                self._waiting.setdefault(key_id, {})[prepared.id] = handed
                return
            else:
                self._in_flight[key_id] += 1
                self._posting_handed(key_id)
                if not self._free.acquire(blocking=False):
                    self._ready.append(handed)
                    return
        if stopping:
            # Stopped since its room was taken: due again at once, for the sweeper.
            self._unclaim([prepared.id])
            return
        self._dispatch(handed)

    def _posting_handed(self, key_id: str) -> None:
        """A delivery handed over leaves the count of those waiting claimed (lock held)."""
        self._handed[key_id] -= 1
        if self._handed[key_id] <= 0:
            del self._handed[key_id]

    def retry_later(self, delivery_id: str, seconds: float) -> None:
        """Send the delivery again in `seconds`, if soon enough to wait here; otherwise the
        sweeper publishes it once due."""
        if seconds > MAX_LOCAL_RETRY_SECONDS:
            return
        with self._lock:
            heapq.heappush(self._retries, (self._clock() + seconds, delivery_id))

    # --- looking and stopping --------------------------------------------------------------

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return dict(self._in_flight)

    def shutdown(self) -> None:
        """Stop taking deliveries and let those being sent finish (each POST ends within its
        15 s timeout, then its record is written). What waits here is left to the sweeper,
        pending in the database: the deliveries handed over claimed, their claims given
        back first, so that they are due at once rather than when their leases run out."""
        self._stopping.set()
        if self._loop is not None:
            self._loop.join()
        with self._lock:
            handed = [
                item.prepared.id
                for item in [*self._ready, *(i for w in self._waiting.values() for i in w.values())]
                if isinstance(item, Handed)
            ]
        if handed:
            self._unclaim(handed)
        self._executor.shutdown(wait=True)
        self._send.close()

    def _unclaim(self, delivery_ids: list[str]) -> None:
        try:
            self._send.unclaim(delivery_ids)
        except Exception:
            # Their leases run out, and the sweeper sends them then.
            log.warning("could not give back %d webhook deliveries' claims", len(delivery_ids))


class BrokerSource:
    """The deliveries published on the broker's Redis (promptq.broker.publish)."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    def take(self, timeout: float) -> str | None:
        return take_delivery(self._app, timeout)
