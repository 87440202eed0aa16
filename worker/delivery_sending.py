"""Sending one webhook delivery, on a thread of the delivery pool (worker.deliveries): the
claim, room for its key, the POST, the attempt recorded, the retry planned."""

from __future__ import annotations

from dataclasses import dataclass

from promptq.broker import task_names
from promptq.clock import utcnow
from promptq.config import Settings
from promptq.db import session_scope
from promptq.logging import log_context
from promptq.webhooks import WebhookSender, deliveries
from promptq.webhooks.deliveries import PreparedDelivery
from worker.deliveries import DeliveryPool

# How long a delivery that found no room, not even in its key's line, waits before the
# sweeper publishes it again.
NO_ROOM_POSTPONE_SECONDS = 2.0


@dataclass(frozen=True)
class DeliverySender:
    settings: Settings
    webhooks: WebhookSender

    def __call__(self, delivery_id: str, pool: DeliveryPool) -> None:
        with log_context(delivery_id=delivery_id, task=task_names.DELIVER_WEBHOOK):
            self._send(delivery_id, pool)

    def send_claimed(self, prepared: PreparedDelivery, pool: DeliveryPool) -> None:
        with log_context(delivery_id=prepared.id, task=task_names.DELIVER_WEBHOOK):
            self._post_and_record(prepared, pool)

    def unclaim(self, delivery_ids: list[str]) -> None:
        with session_scope(self.settings) as session:
            deliveries.unclaim(session, delivery_ids)

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
        """The POST in the room taken for the delivery's key, then its record."""
        try:
            started_at = utcnow()
            result = self.webhooks.post(prepared.url, prepared.body, prepared.headers)
        finally:
            # The key's share covers the wait on its receiver; recording is promptq's own.
            pool.release(prepared.key_id)
        with session_scope(
            self.settings, autocommit=deliveries.records_alone(self.settings)
        ) as session:
            delay = deliveries.record(session, prepared, result, started_at)
        if delay is not None:
            pool.retry_later(prepared.id, delay)
