"""How many upstream calls one worker process keeps in flight: its concurrency.

A worker runs more jobs at once than that (PROMPTQ_WORKER_STANDBY_JOBS more): the extra
ones have their message in hand and wait here for a call to end. When one does, the next
job starts at once, woken by the ending call, instead of waiting for Celery's consumer: a
single greenlet that takes one message per broker round trip and gets its turn only after
every other ready greenlet has had its own, so that when a wave of answers comes back
together (calls started together end together) it brings the next messages in while the
ended jobs record, one at a time (README, "Sizing workers").

Written here rather than taken from gevent or threading: their semaphores cannot be closed,
and a warm shutdown must tell the jobs still waiting to put their message back, not to
start a call of up to a minute that the shutdown would then wait for.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ShuttingDown(Exception):
    """The worker is stopping: a job that had not started its call must not start it."""


class CallSlot:
    """One place among the calls in flight, given back once: by release() as soon as the
    call's answer is in (the job's record need not hold it), else when its `with` ends."""

    def __init__(self, slots: CallSlots) -> None:
        self._slots: CallSlots | None = slots

    def release(self) -> None:
        if self._slots is not None:
            slots, self._slots = self._slots, None
            slots._give_back()


class CallSlots:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"at least one call in flight is needed, not {limit}")
        self.limit = limit
        self._in_use = 0
        self._waiting = 0
        self._closed = False
        # Patched to gevent's in a worker: waiting here yields to the other greenlets.
        # Waiters are woken in the order they came (the broker's order, so priority's).
        self._changed = threading.Condition()

    @contextmanager
    def slot(self, even_when_closed: bool = False) -> Iterator[CallSlot]:
        """A place for one call, waited for while every place is taken. Raises ShuttingDown
        once closed, unless `even_when_closed` (a job that already holds rate-limit budget
        runs rather than leave it unused): it then waits as before."""
        with self._changed:
            while True:
                if self._closed and not even_when_closed:
                    raise ShuttingDown
                if self._in_use < self.limit:
                    break
                self._waiting += 1
                try:
                    self._changed.wait()
                finally:
                    self._waiting -= 1
            self._in_use += 1
        held = CallSlot(self)
        try:
            yield held
        finally:
            held.release()

    def close(self) -> None:
        """No call starts any more: the jobs waiting for a place are woken to be told."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        """Jobs waiting for a slot: a worker's standby jobs, when its calls are all out."""
        return self._waiting

    def _give_back(self) -> None:
        with self._changed:
            self._in_use -= 1
            self._changed.notify()
