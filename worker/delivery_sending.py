"""Sending one webhook delivery, on a thread of the delivery pool (worker.deliveries): the
claim, room for its key, the POST; then the attempt recorded and the retry planned, on a
recording thread of the sender's own.

The record leaves the pool's thread free for the next POST at once, and takes its turn
among the records of the process's jobs (JobRunner.record_turns, shared): when a wave of
jobs ends together, the wave's records and POSTs go first and the deliveries' records after
them, rather than each delivery's thread recording between two POSTs while the wave's later
jobs wait to record and hand theirs over (docs/benchmarks.md, "Webhook delivery delay").
A record is waited for through a database outage (promptq.record_retrying). One not written
when the process dies, or given up on, leaves its delivery claimed: its lease runs out and it
is sent again, with the same webhook-id, as when a process dies mid-POST.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime

from promptq.broker import task_names
from promptq.clock import utcnow
from promptq.config import Settings
from promptq.db import session_scope
from promptq.logging import log_context
from promptq.record_retrying import RECORD_RETRYING
from promptq.webhooks import WebhookSender, deliveries
from promptq.webhooks.deliveries import PreparedDelivery
from promptq.webhooks.sender import DeliveryResult
from worker.deliveries import DeliveryPool

log = logging.getLogger(__name__)

# How long a delivery that found no room, not even in its key's line, waits before the
# sweeper publishes it again.
NO_ROOM_POSTPONE_SECONDS = 2.0


@dataclass(frozen=True)
class Posted:
    """A delivery's attempt whose POST has ended, to be recorded."""

    prepared: PreparedDelivery
    result: DeliveryResult
    started_at: datetime


@dataclass
class DeliverySender:
    settings: Settings
    webhooks: WebhookSender
    # The process's record turns, shared with its jobs' (JobRunner.record_turns); None: a
    # delivery's record waits for nothing but a recording thread.
    record_turns: threading.Semaphore | None = None
    _recording: ThreadPoolExecutor = field(init=False)
    # Attempts posted and not yet recorded, at most as many as the pool has threads: past
    # that, a thread whose POST has ended waits for one of them to be written.
    _unrecorded: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        # As many threads as records may run at once: more would only wait for a turn.
        self._recording = ThreadPoolExecutor(
            max_workers=self.settings.worker_records_at_once,
            thread_name_prefix="webhook-record",
        )
        self._unrecorded = threading.BoundedSemaphore(self.settings.webhook_concurrency)

    def __call__(self, delivery_id: str, pool: DeliveryPool) -> None:
        with log_context(delivery_id=delivery_id, task=task_names.DELIVER_WEBHOOK):
            self._send(delivery_id, pool)

    def send_claimed(self, prepared: PreparedDelivery, pool: DeliveryPool) -> None:
        with log_context(delivery_id=prepared.id, task=task_names.DELIVER_WEBHOOK):
            self._post_and_record(prepared, pool)

    def unclaim(self, delivery_ids: list[str]) -> None:
        with session_scope(self.settings) as session:
            deliveries.unclaim(session, delivery_ids)

    def close(self) -> None:
        """Record every attempt posted so far (the pool's POSTs have ended): a worker that
        stops leaves none behind to be sent again."""
        self._recording.shutdown(wait=True)

    def _send(self, delivery_id: str, pool: DeliveryPool) -> None:
        reserved_for: str | None = None
        try:
            with session_scope(self.settings) as session:
                prepared = deliveries.take(session, delivery_id)
                if prepared is None:
                    return
                if not pool.try_reserve(prepared.key_id):
                    # Not claimed after all: it waits for one of its key's POSTs to end.
                    session.rollback()
                    if not pool.wait_for_room(prepared.key_id, delivery_id):
                        # Behind the other due deliveries, so that a key with thousands of
                        # them waiting cannot keep others' out of the sweeper's passes.
                        deliveries.postpone(session, delivery_id, NO_ROOM_POSTPONE_SECONDS)
                    return
                reserved_for = prepared.key_id
        except BaseException:
            if reserved_for is not None:  # the claim's commit failed: nothing to send
                pool.release(reserved_for)
            raise
        self._post_and_record(prepared, pool)

    def _post_and_record(self, prepared: PreparedDelivery, pool: DeliveryPool) -> None:
        """The POST in the room taken for the delivery's key, then its record, handed to a
        recording thread when one may take it."""
        try:
            started_at = utcnow()
            result = self.webhooks.post(prepared.url, prepared.body, prepared.headers)
        finally:
            # The key's share covers the wait on its receiver; recording is promptq's own.
            pool.release(prepared.key_id)
        posted = Posted(prepared, result, started_at)
        # Waits while the pool's worth of attempts wait to be recorded: the database is
        # slower than the receivers, and the POSTs slow down to its pace.
        self._unrecorded.acquire()
        try:
            self._recording.submit(self._record_handed, posted, pool)
        except RuntimeError:
            # Closed meanwhile (a POST that ended as the worker stopped): recorded here.
            self._unrecorded.release()
            self._record(posted, pool)

    def _record_handed(self, posted: Posted, pool: DeliveryPool) -> None:
        delivery_id = posted.prepared.id
        try:
            with log_context(delivery_id=delivery_id, task=task_names.DELIVER_WEBHOOK):
                self._record(posted, pool)
        except Exception:
            # Left claimed: its lease runs out and the sweeper sends it again.
            log.exception(
                "webhook delivery %s: its attempt could not be recorded; it will be sent again",
                delivery_id,
            )
        finally:
            self._unrecorded.release()

    def _record(self, posted: Posted, pool: DeliveryPool) -> None:
        """The attempt's record in its turn (record_turns), waited for through a database
        outage (not written, its delivery would be sent again once its lease runs out), then
        its retry planned. A turn is one try: a record waiting out an outage holds none."""
        turn: AbstractContextManager[object] = self.record_turns or nullcontext()
        for retrying in RECORD_RETRYING:
            with (
                retrying,
                turn,
                session_scope(
                    self.settings, autocommit=deliveries.records_alone(self.settings)
                ) as session,
            ):
                delay = deliveries.record(
                    session, posted.prepared, posted.result, posted.started_at
                )
        if delay is not None:
            pool.retry_later(posted.prepared.id, delay)
