"""Jobs posted at once, taken in together: a group commit for intake.

A job's intake is a few milliseconds of this process's one core (the GIL) and three round
trips (its quotas in Redis, its row, its message). Sent one by one to a thread each, the
hand-over to the thread and back cost about a quarter of that CPU, and every job paid its
own round trips. Here the event loop queues each job's ticket and one thread takes every
ticket waiting at once (up to MOST_AT_ONCE): the quotas of all of them in one Redis round
trip, their rows in one INSERT, their messages in one pipeline (api.intake.accept_jobs).
Nothing waits for a batch to fill: a job posted to an idle API goes at once, alone, as
before; only jobs posted while a batch is in the thread wait for it, and go together next.
(No library does this for an ASGI app; it is a queue and a loop.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio.to_thread
from anyio import CapacityLimiter

# Tickets one thread takes at once: a batch's INSERT and pipeline stay small, and a flood
# of posts is answered in turns rather than in one late batch.
MOST_AT_ONCE = 64

Ticket = TypeVar("Ticket")
# A ticket's outcome: the answer's body, or the error its request raises.
Outcome = dict[str, Any] | Exception


class IntakeLine(Generic[Ticket]):
    """Tickets waiting to be taken in, and the one batch of them in a thread."""

    def __init__(
        self,
        accept: Callable[[Sequence[Ticket]], list[Outcome]],
        most_at_once: int = MOST_AT_ONCE,
    ) -> None:
        self._accept = accept
        self._most_at_once = most_at_once
        # One batch in a thread at a time: with two, each took half the tickets waiting,
        # and intake managed 766 and 773 jobs/s at 1.24 ms of CPU a job against 945 and
        # 961 at 0.85 ms with one (bench/throughput.py, alternating runs). A thread of its
        # own, too: anyio's shared threads serve every other route.
        self._thread = CapacityLimiter(1)
        self._waiting: list[tuple[Ticket, asyncio.Future[dict[str, Any]]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def take_in(self, ticket: Ticket) -> dict[str, Any]:
        """The answer's body for `ticket` once its batch is committed; its error, raised,
        when it was refused."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._waiting.append((ticket, future))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        batch: list[tuple[Ticket, asyncio.Future[dict[str, Any]]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self._most_at_once]
                del self._waiting[: len(batch)]
                try:
                    outcomes = await anyio.to_thread.run_sync(
                        self._accept, [ticket for ticket, _ in batch], limiter=self._thread
                    )
                except Exception as exc:  # each request of the batch raises it
                    outcomes = [exc] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # its request was cancelled (its client went away)
                        continue
                    if isinstance(outcome, Exception):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
                batch = []
        finally:
            self._drainer = None
            # Cancelled (the server stopping): nobody is left to answer these.
            for _, future in batch + self._waiting:
                future.cancel()
            self._waiting.clear()
