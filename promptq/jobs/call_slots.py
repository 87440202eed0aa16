"""How many upstream calls one worker process keeps in flight: its concurrency.

A worker runs more jobs at once than that (PROMPTQ_WORKER_STANDBY_JOBS more): the extra
ones have their message in hand and wait here for a call to end. When one does, the next
job starts at once, woken by the ending call, instead of waiting for Celery's consumer: a
single greenlet that takes one message per broker round trip and gets its turn only after
every other ready greenlet has had its own, so that when a wave of answers comes back
together (calls started together end together) it brings the next messages in while the
ended jobs record, one at a time (README, "Sizing workers").

A job that waits is served by its rank, its message's priority on the broker (lower
first), then in the order it came: a standby job is the broker's next message taken early,
and a job published later at a higher priority, once this worker takes it, goes before the
standby jobs of lower priority already waiting here rather than behind them.

Written here rather than taken from gevent or threading: their semaphores cannot be closed,
and a warm shutdown must tell the jobs still waiting to put their message back, not to
start a call of up to a minute that the shutdown would then wait for; nor do they serve
their waiters by rank.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


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


@dataclass(order=True)
class _Waiter:
    """A job waiting for a slot, in line by (rank, arrival). A slot given back goes to the
    first in line directly (granted), so that nobody arriving meanwhile takes it first."""

    rank: int
    arrival: int
    woken: threading.Condition = field(compare=False)
    even_when_closed: bool = field(compare=False)
    granted: bool = field(default=False, compare=False)


class CallSlots:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"at least one call in flight is needed, not {limit}")
        self.limit = limit
        self._in_use = 0
        self._closed = False
        # Patched to gevent's in a worker: waiting here yields to the other greenlets.
        self._lock = threading.Lock()
        self._line: list[_Waiter] = []  # a heap
        self._arrivals = itertools.count()

    @contextmanager
    def slot(self, even_when_closed: bool = False, rank: int = 0) -> Iterator[CallSlot]:
        """A place for one call, waited for while every place is taken: after the waiting
        jobs of a lower `rank` and those of its own rank that came first. Raises
        ShuttingDown once closed, unless `even_when_closed` (a job that already holds
        rate-limit budget runs rather than leave it unused): it then waits as before."""
        with self._lock:
            if self._closed and not even_when_closed:
                raise ShuttingDown
            if self._in_use < self.limit and not self._line:
                self._in_use += 1
            else:
                self._wait_in_line(rank, even_when_closed)
        held = CallSlot(self)
        try:
            yield held
        finally:
            held.release()

    def _wait_in_line(self, rank: int, even_when_closed: bool) -> None:
        """With the lock held: returns once given a slot (counted in use already)."""
        waiter = _Waiter(
            rank, next(self._arrivals), threading.Condition(self._lock), even_when_closed
        )
        heapq.heappush(self._line, waiter)
        try:
            while not waiter.granted:
                if self._closed and not even_when_closed:
                    raise ShuttingDown
                waiter.woken.wait()
        except BaseException:
            if waiter.granted:
                # Given a slot as it was interrupted: it goes to the next in line.
                self._pass_on()
            elif waiter in self._line:
                self._line.remove(waiter)
                heapq.heapify(self._line)
            raise

    def close(self) -> None:
        """No call starts any more: the jobs waiting for a place are woken to be told."""
        with self._lock:
            self._closed = True
            for waiter in self._line:
                waiter.woken.notify()
            # Out of line at once, so that a slot freed from now on goes only to a job
            # that may still take one.
            self._line = [waiter for waiter in self._line if waiter.even_when_closed]
            heapq.heapify(self._line)

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        """Jobs waiting for a slot: a worker's standby jobs, when its calls are all out."""
        return len(self._line)

    def _give_back(self) -> None:
        with self._lock:
            self._pass_on()

    def _pass_on(self) -> None:
        """With the lock held: a slot freed goes to the first in line, else it is free."""
        if self._line:
            waiter = heapq.heappop(self._line)
            waiter.granted = True
            waiter.woken.notify()
        else:
            self._in_use -= 1
