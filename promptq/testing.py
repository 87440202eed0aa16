"""What the test suites (tests/unit, tests/stack) and the benchmarks (bench/) share: one
place for the constants they would otherwise each write down again. promptq itself never
imports this module."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# The statuses a job ends in, as the API spells them. Written out rather than taken from
# promptq.models.FINAL_STATUSES, so that a change to the code's idea of "final" shows up
# in the tests instead of moving with them.
FINAL = frozenset({"succeeded", "failed", "canceled"})

# Rate limits far above what any test or benchmark sends (the largest the limit table
# accepts), so that the limiter does all its bookkeeping, as in production, but never makes
# a job wait: only the tests of the limits themselves, which set their own, ever wait for
# budget, and the benchmarks measure promptq rather than the built-in limits (CometAPI's
# defaults: 50 requests a minute, 20 in flight).
GENEROUS_LIMITS = "".join(
    f"""
[models."{pattern}"]
rpm = 1000000
input_tpm = 100000000
output_tpm = 100000000
max_concurrency = 10000
"""
    for pattern in ("*", "claude-*")
)

# Models with built-in prices, by the names the tests give them.
SONNET = "claude-sonnet-4-5-20250929"
HAIKU = "claude-haiku-4-5-20251001"


@dataclass
class SentMessages:
    """An in-memory promptq.outbox.Messenger: what committed units of work sent, in order,
    as ("publish_job", job_id, priority, countdown), ("deliver_webhook", delivery_id),
    ("announce_finished", job_id) and ("feed_batch", batch_id)."""

    sent: list[tuple[object, ...]] = field(default_factory=list)
    # How many jobs each publish_jobs call published together (each is in `sent` too).
    batches: list[int] = field(default_factory=list)

    def publish_job(self, job_id: str, priority: str, countdown: float | None = None) -> None:
        self.sent.append(("publish_job", job_id, priority, countdown))

    def publish_jobs(self, jobs: Sequence[tuple[str, str]]) -> None:
        self.batches.append(len(jobs))
        for job_id, priority in jobs:
            self.publish_job(job_id, priority)

    def deliver_webhook(self, delivery_id: str) -> None:
        self.sent.append(("deliver_webhook", delivery_id))

    def announce_finished(self, job_id: str) -> None:
        self.sent.append(("announce_finished", job_id))

    def feed_batch(self, batch_id: str) -> None:
        self.sent.append(("feed_batch", batch_id))

    def of_kind(self, kind: str) -> list[tuple[object, ...]]:
        """The messages of one kind, without it."""
        return [message[1:] for message in self.sent if message[0] == kind]

    @property
    def deliveries(self) -> list[str]:
        return [str(message[0]) for message in self.of_kind("deliver_webhook")]

    @property
    def announced(self) -> list[str]:
        return [str(message[0]) for message in self.of_kind("announce_finished")]


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the name `localhost` only (no IP address in it), and its
    key, made in `folder` by the `openssl` command (FileNotFoundError without it)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key
