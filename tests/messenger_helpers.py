"""An in-memory promptq.outbox.Messenger: what a committed unit of work sent, in order."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SentMessages:
    # ("publish_job", job_id, priority, countdown), ("deliver_webhook", delivery_id), ...
    sent: list[tuple[object, ...]] = field(default_factory=list)

    def publish_job(self, job_id: str, priority: str, countdown: float | None = None) -> None:
        self.sent.append(("publish_job", job_id, priority, countdown))

    def deliver_webhook(self, delivery_id: str) -> None:
        self.sent.append(("deliver_webhook", delivery_id))

    def announce_finished(self, job_id: str) -> None:
        self.sent.append(("announce_finished", job_id))

    def feed_batch(self, batch_id: str) -> None:
        self.sent.append(("feed_batch", batch_id))

    def of_kind(self, kind: str) -> list[tuple[object, ...]]:
        return [message[1:] for message in self.sent if message[0] == kind]

    @property
    def deliveries(self) -> list[str]:
        return [str(message[0]) for message in self.of_kind("deliver_webhook")]
