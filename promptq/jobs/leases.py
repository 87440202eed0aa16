"""Keeps the claims of a process's in-flight calls alive.

A claim is a lease of `claim_lease_seconds` on the job row, and a call's concurrency slot is
a lease in Redis; this thread renews both for every call the process has in flight, so a
long call keeps its job and its slot, while those of a process that died are taken back
within one lease.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from promptq.clock import utcnow
from promptq.config import Settings
from promptq.db import session_scope
from promptq.jobs.repository import JobRepository
from promptq.ratelimit.protocol import Grant, Limiter

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, settings: Settings, limiter: Limiter) -> None:
        self.settings = settings
        self.limiter = limiter
        self._held: dict[str, Grant] = {}
        self._lock = threading.Lock()
        # Held while the slots are renewed: a renewal puts back a slot Redis lost, so a call
        # must not leave `holding` (and settle, freeing its slot) while a renewal that saw
        # it is under way, or its slot would come back for a lease.
        self._renewing = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def holding(self, job_id: str, grant: Grant) -> Iterator[None]:
        self._ensure_running()
        with self._lock:
            self._held[job_id] = grant
        try:
            yield
        finally:
            with self._renewing, self._lock:
                self._held.pop(job_id, None)

    def renew(self) -> int:
        with self._renewing:
            with self._lock:
                held = dict(self._held)
            if not held:
                return 0
            self.limiter.renew(held.values(), held.keys())
        lease_until = utcnow() + timedelta(seconds=self.settings.claim_lease_seconds)
        with session_scope(self.settings) as session:
            return JobRepository(session).extend_leases(sorted(held), lease_until)

    def running_calls(self, model: str) -> list[tuple[str, float]]:
        """The model's running jobs and the seconds left of each one's claim, by the
        database: what the limiter rebuilds its in-flight slots from (Limiter.running_calls).
        A claim's lease is renewed together with its slot, so it is the slot's lease too."""
        now = utcnow()
        with session_scope(self.settings) as session:
            leases = JobRepository(session).live_leases(model, now)
        return [(job_id, (until - now).total_seconds()) for job_id, until in leases]

    def stop(self) -> None:
        self._stop.set()

    def _ensure_running(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="promptq-leases", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        # A third of the shorter lease: two renewals may fail before anything is lost.
        interval = min(self.settings.claim_lease_seconds, self.limiter.slot_lease_ms / 1000) / 3
        while not self._stop.wait(interval):
            try:
                self.renew()
            except Exception:  # a database or Redis hiccup must not end the renewals for good
                log.exception("renewing leases failed; retrying in %.0fs", interval)
