"""Keeps the claims of a process's in-flight jobs alive.

A claim is a lease of `claim_lease_seconds`; this thread renews the leases of every job the
process is calling the upstream for, so a long call keeps its job, while the jobs of a
process that died are taken back by the sweeper within one lease.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from promptq.config import Settings
from promptq.db import session_scope
from promptq.jobs.repository import JobRepository
from promptq.types import utcnow

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def holding(self, job_id: str) -> Iterator[None]:
        self._ensure_running()
        with self._lock:
            self._held.add(job_id)
        try:
            yield
        finally:
            with self._lock:
                self._held.discard(job_id)

    def renew(self) -> int:
        with self._lock:
            job_ids = sorted(self._held)
        if not job_ids:
            return 0
        lease_until = utcnow() + timedelta(seconds=self.settings.claim_lease_seconds)
        with session_scope(self.settings.database_url) as session:
            return JobRepository(session).extend_leases(job_ids, lease_until)

    def _ensure_running(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="promptq-leases", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        interval = self.settings.claim_lease_seconds / 3
        while True:
            time.sleep(interval)
            try:
                self.renew()
            except Exception:  # a database hiccup must not end the renewals for good
                log.exception("renewing job leases failed; retrying in %.0fs", interval)
