"""A Limiter (promptq.ratelimit.protocol) in one process's memory, for tests that run jobs
without a Redis (tests/unit).

It meters what the Redis limiter meters, per model: requests and input and output tokens as
GCRA meters of the same depths, calls in flight as slots with leases, and the pause a 429
asks for; a key's rpm reserves start times as the Redis limiter's does. A job that must
wait joins the model's queue, ordered by priority, then arrival; a job arriving while others
wait queues behind them. What it leaves out, being one process's: sharing anything between
processes, the adaptive share of the rate after 429s, limits reported in the upstream's
headers, cached prompt prefixes, and turns between client keys within a priority. Those
are tested on the Redis limiter, against a real Redis (tests/stack).

Its clock is a function (time.monotonic by default), so a test can move time on by hand.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from promptq.priority import Priority
from promptq.ratelimit.estimate import estimate_input_tokens, output_reservation
from promptq.ratelimit.headers import ReportedLimits, read_rate_limit_headers
from promptq.ratelimit.limiter import TOKEN_METER_SHARE
from promptq.ratelimit.protocol import Decision, Dispatch, Grant, Limiter, refunds_of
from promptq.ratelimit.table import LimitTable, ModelLimits
from promptq.usage import Usage

# The Redis limiter's answer to a full set of slots: look again in 50 ms.
CONCURRENCY_WAIT_SECONDS = 0.05


@dataclass
class _Waiting:
    rank: int
    arrival: int
    job_id: str
    input_tokens: int
    output_tokens: int

    @property
    def order(self) -> tuple[int, int]:
        return (self.rank, self.arrival)


@dataclass
class _Model:
    # GCRA: per meter ("req", "inp", "out"), the moment everything admitted is paid for.
    paid_until: dict[str, float] = field(default_factory=dict)
    # Grant id -> the moment its slot lapses unless renewed.
    slots: dict[str, float] = field(default_factory=dict)
    waiting: dict[str, _Waiting] = field(default_factory=dict)
    paused_until: float = 0.0


class MemoryLimiter(Limiter):
    def __init__(
        self,
        table: LimitTable,
        slot_lease_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.slot_lease_ms = slot_lease_seconds * 1000
        self._clock = clock
        self._models: dict[str, _Model] = {}
        self._keys: dict[str, float] = {}
        self._arrivals = itertools.count()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the protocol

    def acquire(
        self,
        job_id: str,
        model: str,
        request: Mapping[str, Any],
        priority: str,
        client_key: str = "",
        high_waiting: int | None = None,
        rebuild: bool = True,  # this process's own state is never lost
    ) -> Decision:
        limits = self.table.limits_for(model)
        waiting = _Waiting(
            Priority.named(priority).rank,
            0,
            job_id,
            estimate_input_tokens(request),
            output_reservation(request),
        )
        with self._lock:
            state = self._models.setdefault(model, _Model())
            if job_id in state.waiting:
                # Its message came again: it keeps its place.
                return Decision(waiting_for="queue")
            if state.waiting:
                # Jobs already waiting go first, whatever the budget.
                reason, wait = "queue", 0.0
            else:
                granted = self._grant(state, model, limits, waiting)
                if isinstance(granted, Grant):
                    return Decision(grant=granted)
                reason, wait = granted
            waiting.arrival = next(self._arrivals)
            state.waiting[job_id] = waiting
            return Decision(waiting_for=reason, wait_seconds=wait)

    def dispatch(self, model: str) -> Dispatch:
        limits = self.table.limits_for(model)
        with self._lock:
            state = self._models.get(model)
            if state is None or not state.waiting:
                return Dispatch(empty=True)
            head = min(state.waiting.values(), key=lambda w: w.order)
            granted = self._grant(state, model, limits, head)
            if not isinstance(granted, Grant):
                return Dispatch(wait_seconds=granted[1])
            del state.waiting[head.job_id]
            return Dispatch(job_id=head.job_id, priority=Priority.of_rank(head.rank), grant=granted)

    def waiting_models(self) -> list[str]:
        with self._lock:
            return sorted(model for model, state in self._models.items() if state.waiting)

    def queued(self, jobs: list[tuple[str, str]]) -> set[str]:
        with self._lock:
            return {
                job_id
                for job_id, model in jobs
                if model in self._models and job_id in self._models[model].waiting
            }

    def settle(
        self,
        grant: Grant,
        usage: Usage | None,
        called: bool = True,
        request: Mapping[str, Any] | None = None,
    ) -> None:
        limits = self.table.limits_for(grant.model)
        refunds = refunds_of(grant, usage, called, limits)
        with self._lock:
            state = self._models.setdefault(grant.model, _Model())
            state.slots.pop(grant.id, None)
            back = {
                "req": refunds.requests,
                "inp": refunds.input_tokens,
                "out": refunds.output_tokens,
            }
            for meter, limit, _ in _meters(limits):
                refund = back[meter]
                if limit and meter in state.paid_until and refund:
                    state.paid_until[meter] -= refund * 60 / limit

    def finish(
        self,
        grant: Grant,
        usage: Usage | None,
        request: Mapping[str, Any] | None,
        headers: Mapping[str, str],
        throttled: bool,
        retry_after: float | None,
    ) -> None:
        self.settle(grant, usage, called=True, request=request)
        if throttled or headers:
            self.feedback(grant.model, headers, throttled, retry_after)

    def feedback(
        self, model: str, headers: Mapping[str, str], throttled: bool, retry_after: float | None
    ) -> ReportedLimits:
        reported = read_rate_limit_headers(headers)
        if throttled:
            pause = retry_after if retry_after is not None else 1.0
            with self._lock:
                state = self._models.setdefault(model, _Model())
                state.paused_until = max(state.paused_until, self._clock() + pause)
        return reported

    def renew(self, grants: Iterable[Grant], job_ids: Iterable[str] = ()) -> None:
        # As the Redis limiter does, a held grant's slot is put back if it had lapsed. The
        # job ids go unused: this limiter's state is never lost while its process's calls
        # live, so it never rebuilds and has no stand-in slots for a grant to replace.
        with self._lock:
            lapse = self._clock() + self.slot_lease_ms / 1000
            for grant in grants:
                self._models.setdefault(grant.model, _Model()).slots[grant.id] = lapse

    def rebuild(self, model: str) -> int:
        return 0  # this process's own state is never lost

    def reserve_for_key(self, key_id: str, rpm: int, burst_seconds: float = 0.5) -> float:
        per_request = 60 / rpm
        allowance = max(burst_seconds, per_request)
        with self._lock:
            now = self._clock()
            paid_until = max(self._keys.get(key_id, 0.0), now)
            start = max(now, paid_until + per_request - allowance)
            self._keys[key_id] = paid_until + per_request
            return start - now

    # ------------------------------------------------------------------ for tests to look at

    def in_flight(self, model: str) -> int:
        """Slots held (granted and neither settled nor lapsed)."""
        with self._lock:
            state = self._models.get(model)
            if state is None:
                return 0
            now = self._clock()
            return sum(1 for lapse in state.slots.values() if lapse > now)

    def waiting(self, model: str) -> list[str]:
        """The model's queue, head first."""
        with self._lock:
            state = self._models.get(model)
            if state is None:
                return []
            return [w.job_id for w in sorted(state.waiting.values(), key=lambda w: w.order)]

    # ------------------------------------------------------------------ inside

    def _grant(
        self, state: _Model, model: str, limits: ModelLimits, call: _Waiting
    ) -> Grant | tuple[str, float]:
        """A grant for `call` with its charges taken, or (what it waits for, how long)."""
        now = self._clock()
        if state.paused_until > now:
            return "upstream_backoff", state.paused_until - now
        charges = {"req": 1, "inp": call.input_tokens, "out": call.output_tokens}
        paid_until: dict[str, float] = {}
        worst: tuple[str, float] | None = None
        for meter, limit, depth in _meters(limits):
            if not limit:
                continue
            increment = charges[meter] * 60 / limit
            start = max(state.paid_until.get(meter, 0.0), now)
            # A call larger than the meter still goes once it is full, leaving it in debt.
            wait = start + increment - max(depth, increment) - now
            if wait > 1e-6:
                if worst is None or wait > worst[1]:
                    worst = (_REASONS[meter], wait)
            else:
                paid_until[meter] = start + increment
        if worst is not None:
            return worst
        state.slots = {grant: lapse for grant, lapse in state.slots.items() if lapse > now}
        if limits.max_concurrency and len(state.slots) >= limits.max_concurrency:
            return "concurrency", CONCURRENCY_WAIT_SECONDS
        state.paid_until.update(paid_until)
        grant = Grant(uuid.uuid4().hex, model, call.input_tokens, call.output_tokens)
        state.slots[grant.id] = now + self.slot_lease_ms / 1000
        return grant


_REASONS = {"req": "rpm", "inp": "input_tpm", "out": "output_tpm"}


def _meters(limits: ModelLimits) -> list[tuple[str, int | None, float]]:
    """(meter, its per-minute limit or None, its depth in seconds), as the Redis limiter
    has them."""
    token_depth = limits.token_burst_seconds * TOKEN_METER_SHARE
    return [
        ("req", limits.rpm, limits.burst_seconds),
        ("inp", limits.input_tpm, token_depth),
        ("out", limits.output_tpm, token_depth),
    ]
