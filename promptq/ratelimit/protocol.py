"""What the code that runs jobs asks of a limiter, and what a limiter hands back.

Two limiters answer it: `RedisLimiter` (promptq.ratelimit.limiter), the one every worker
process of a deployment shares, and `MemoryLimiter` (promptq.ratelimit.memory), one
process's own, for tests that run jobs without a Redis.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from promptq.ratelimit.headers import ReportedLimits
from promptq.ratelimit.table import ModelLimits
from promptq.usage import Usage


@dataclass(frozen=True)
class Grant:
    """Budget handed to one upstream call: its slot, and the tokens charged for it."""

    id: str
    model: str
    input_tokens: int
    output_tokens: int

    def to_message(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }

    @classmethod
    def from_message(cls, data: Mapping[str, Any]) -> Grant:
        return cls(
            id=str(data["id"]),
            model=str(data["model"]),
            input_tokens=int(data["input_tokens"]),
            output_tokens=int(data["output_tokens"]),
        )


@dataclass(frozen=True)
class Decision:
    grant: Grant | None = None
    # When not granted: what the job waits for (rpm, input_tpm, output_tpm, concurrency,
    # upstream_backoff, or queue: behind other waiting jobs) and a hint of how long.
    waiting_for: str | None = None
    wait_seconds: float = 0.0


@dataclass(frozen=True)
class Dispatch:
    """The result of offering budget to a model's queue."""

    job_id: str | None = None
    priority: str | None = None
    grant: Grant | None = None
    wait_seconds: float = 0.0
    empty: bool = False


class Refunds(NamedTuple):
    """What a settled grant gives back to the model's meters."""

    input_tokens: int  # negative: the call used more than was charged
    output_tokens: int
    requests: int  # 1 when the upstream was never called


def refunds_of(grant: Grant, usage: Usage | None, called: bool, limits: ModelLimits) -> Refunds:
    """A grant's charges less what its call really used: every limiter settles by this."""
    if not called:
        return Refunds(grant.input_tokens, grant.output_tokens, 1)
    if usage is None:
        # No answer to count: the upstream generated nothing, so the output reservation
        # comes back; the input charge stays, to stay on the safe side.
        return Refunds(0, grant.output_tokens, 0)
    # Cache writes count as input; cache reads do not, unless this upstream says so.
    used_input = usage.input_tokens + usage.cache_creation_input_tokens
    if limits.count_cache_reads:
        used_input += usage.cache_read_input_tokens
    return Refunds(grant.input_tokens - used_input, grant.output_tokens - usage.output_tokens, 0)


class RebuildNeeded(Exception):
    """The limiter lost the model's state (a Redis restart or failover) and must rebuild it
    from the running jobs in the database before it can decide: raised by acquire() when
    its caller asked it not to rebuild there (it holds a transaction open, and a rebuild
    reads the database: behind a pooler, every claim of the moment would hold a server
    connection while waiting for another)."""

    def __init__(self, model: str) -> None:
        super().__init__(f"the limiter's state of {model} must be rebuilt first")
        self.model = model


class Limiter(Protocol):
    """The account's rate limits as the worker sees them: a job arriving is granted budget
    or queued; a queue's head is granted budget as it frees up; a call's grant is settled
    (corrected by what it used) when the call ends, and renewed while it lasts."""

    # How long a grant's slot lives unrenewed: a process that died frees its slots by then.
    slot_lease_ms: float

    def acquire(
        self,
        job_id: str,
        model: str,
        request: Mapping[str, Any],
        priority: str,
        client_key: str = "",
        high_waiting: int | None = None,
        rebuild: bool = True,
    ) -> Decision:
        """Budget for a job that just arrived, or its place in the model's queue. With
        `rebuild=False`, RebuildNeeded instead of rebuilding lost state here."""
        ...

    def dispatch(self, model: str) -> Dispatch:
        """Budget for the first job in the model's queue, if there is budget now."""
        ...

    def waiting_models(self) -> list[str]:
        """The models with jobs in their queue."""
        ...

    def queued(self, jobs: list[tuple[str, str]]) -> set[str]:
        """Which of these (job id, model) pairs wait in their model's queue."""
        ...

    def settle(
        self,
        grant: Grant,
        usage: Usage | None,
        called: bool = True,
        request: Mapping[str, Any] | None = None,
    ) -> None:
        """Free the grant's slot and correct its charges by what the call used (all of
        them back when the upstream was never called)."""
        ...

    def feedback(
        self, model: str, headers: Mapping[str, str], throttled: bool, retry_after: float | None
    ) -> ReportedLimits:
        """What the upstream said of its limits: a 429, its rate-limit headers."""
        ...

    def finish(
        self,
        grant: Grant,
        usage: Usage | None,
        request: Mapping[str, Any] | None,
        headers: Mapping[str, str],
        throttled: bool,
        retry_after: float | None,
    ) -> None:
        """The end of a call that was made: settle() its grant, and feedback() what the
        upstream said of its limits, together (the Redis limiter: one round trip)."""
        ...

    def renew(self, grants: Iterable[Grant], job_ids: Iterable[str] = ()) -> None:
        """Keep the slots of calls still in flight, putting back any the limiter lost (a
        Redis failover or restart). The caller renews only grants it still holds, never one
        it settled. `job_ids`, when given, are the grants' jobs, one each: a grant's own slot
        replaces the stand-in a rebuild put back for its job (RedisLimiter.rebuild)."""
        ...

    def rebuild(self, model: str) -> int:
        """Put back the model's lost state (its calls in flight, from the running jobs);
        how many slots were put back."""
        ...

    def reserve_for_key(self, key_id: str, rpm: int, burst_seconds: float = 0.5) -> float:
        """Seconds until a job of this client key may go, its place in the key's rate
        taken now."""
        ...
