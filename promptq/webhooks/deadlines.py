"""Each webhook POST's overall deadline, kept by one watcher thread for the whole process.

Socket timeouts bound each read, not their sum: a server sending a byte a second outlasts
them. So every POST has a deadline, and when it passes, its sockets are shut down, which
wakes a read blocked on them with the end of the stream.

One thread watches them all, rather than a `threading.Timer` per POST: starting a thread
waits until it runs, and in a worker (gevent) that wait is a trip to the back of the line of
every greenlet ready to run, paid by each POST while it holds one of its key's few places
(worker.deliveries), so that the deliveries in its line wait for it too. Traced in
bench/webhook_delay.py, starting the Timer took 0.7 to 1.7 ms at the median, 3 to 16 ms at
p95; in 24 alternating runs of it, first delivery p95 was lower with the watcher in 17
(medians 200 and 259 ms against 250 and 314, on slow hours). No library keeps deadlines for
sockets the HTTP client opens (urllib3 only has per-operation timeouts); the heap below is
that.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import threading
import time
import weakref
from contextlib import suppress

log = logging.getLogger(__name__)


class Deadline:
    """A POST's deadline `seconds` from now: the sockets it is given to watch are shut down
    when it passes. Closed when the POST ends (`close`), which also closes the descriptors it
    holds."""

    def __init__(self, seconds: float, watcher: DeadlineWatcher | None = None) -> None:
        self.expired = False
        self.closed = False
        self.at = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._watched: list[socket.socket] = []
        (watcher or _WATCHER).add(self)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        # A duplicate descriptor: TLS wrapping takes the original one over, and shutdown()
        # acts on the socket itself, through whichever descriptor it is called.
        with self._lock:
            if self.closed:
                return  # the POST is over: nothing to end
            self._watched.append(sock.dup())
            if self.expired:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def expire(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.expired = True
            for sock in self._watched:
                # Wakes a read blocked in the delivering thread: it sees the end of the stream.
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            for sock in self._watched:
                sock.close()
            self._watched.clear()


class DeadlineWatcher:
    """Expires deadlines as they pass, on one daemon thread started with the first one."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        # (when, order of arrival, deadline): the earliest first. A closed deadline stays
        # until it comes up or the heap is compacted (_compact).
        self._heap: list[tuple[float, int, Deadline]] = []
        self._arrivals = itertools.count()
        self._thread: threading.Thread | None = None
        self._compact_above = COMPACT_ABOVE
        # Weakly: a watcher is not kept alive by the interpreter's list of fork hooks.
        start_afresh = weakref.WeakMethod(self._start_afresh)
        os.register_at_fork(after_in_child=lambda: (method := start_afresh()) and method())

    def add(self, deadline: Deadline) -> None:
        with self._changed:
            heapq.heappush(self._heap, (deadline.at, next(self._arrivals), deadline))
            if len(self._heap) > self._compact_above:
                self._compact()
            if self._thread is None:
                # Once per process (_start_afresh in a child): the first POST waits for this
                # thread to start.
                self._thread = threading.Thread(
                    target=self._run, name="webhook-deadlines", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is deadline:
                self._changed.notify()

    def _start_afresh(self) -> None:
        """In a child forked from this process: the parent's thread does not run here, its
        lock may have been held at the fork (by that thread, which would never let it go),
        and the deadlines held are the parent's POSTs, not the child's."""
        self._changed = threading.Condition()
        self._heap = []
        self._thread = None
        self._compact_above = COMPACT_ABOVE

    def pending(self) -> int:
        """Deadlines neither passed nor closed."""
        with self._changed:
            return sum(1 for _, _, deadline in self._heap if not deadline.closed)

    def held(self) -> int:
        """Deadlines kept, closed ones included: what the heap costs."""
        with self._changed:
            return len(self._heap)

    def _compact(self) -> None:
        """Drop the closed deadlines (lock held): most POSTs end long before theirs pass, so
        a busy process would otherwise keep a timeout's worth of them."""
        self._heap = [entry for entry in self._heap if not entry[2].closed]
        heapq.heapify(self._heap)
        # With thousands still open, not again until as many more have come.
        self._compact_above = max(COMPACT_ABOVE, 2 * len(self._heap))

    def _run(self) -> None:
        while True:
            with self._changed:
                due = self._take_due()
                while not due:
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._changed.wait(timeout=wait)
                    due = self._take_due()
            for deadline in due:
                try:
                    deadline.expire()
                except Exception:
                    # The thread must outlive any one deadline: the others' POSTs rely on it.
                    log.exception("could not end a webhook POST past its deadline")

    def _take_due(self) -> list[Deadline]:
        now = time.monotonic()
        due: list[Deadline] = []
        while self._heap and (self._heap[0][2].closed or self._heap[0][0] <= now):
            deadline = heapq.heappop(self._heap)[2]
            if not deadline.closed:
                due.append(deadline)
        return due


# Past this many deadlines held, the closed ones are dropped: a few hundred kilobytes at most.
COMPACT_ABOVE = 4096

_WATCHER = DeadlineWatcher()
