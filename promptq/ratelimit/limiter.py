"""The account-wide limiter: every worker process on every machine asks the same Redis.

Each decision is one Lua script run atomically on Redis's clock. Per model there are three
GCRA meters (requests, smoothed over `burst_seconds`; input and output tokens, as deep as
the upstream's own minute-deep buckets), a set of in-flight slots with leases,
a pause set by the upstream's 429s, an adaptive share of the configured rate, and a queue of
jobs waiting for budget, ordered by priority and arrival. A job arriving while others wait
queues behind them; dispatchers hand the budget to the queue's head as it frees up.

After a Redis failover or restart that lost the state, the limiter errs by a bounded amount:
- in-flight slots: a model with a concurrency limit grants nothing until its slots are
  rebuilt from the running jobs in the database (`running_calls`), one stand-in per job
  until its lease ends; the workers' next renewal (within a third of the shorter lease)
  puts back every held grant's own slot. Only calls granted but not yet claimed in the
  database at the moment of the loss can run beyond the limit.
- rates: the meters start full, so at most `burst_seconds` of the request rate (and
  `token_burst_seconds` of the token rates) goes at once beyond the steady rate, once.
- a 429's pause and the learned rate are forgotten: the next 429 teaches them again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import redis

from promptq import redis_keys
from promptq.priority import Priority
from promptq.ratelimit.estimate import (
    CachePrefix,
    cache_prefixes,
    estimate_input_tokens,
    output_reservation,
)
from promptq.ratelimit.headers import ReportedLimits, read_rate_limit_headers
from promptq.ratelimit.protocol import (
    Decision,
    Dispatch,
    Grant,
    Limiter,
    RebuildNeeded,
    refunds_of,
)
from promptq.ratelimit.table import LimitTable, ModelLimits
from promptq.redis_keys import (
    MODEL_STATE_PATTERN,
    MODELS_WAITING,
    key_rate,
    model_limiter_base,
    model_of_state_key,
)
from promptq.usage import Usage

log = logging.getLogger(__name__)

DEFAULT_HIGH_WAITING_PER_KEY = 5

# A script to run, with its keys and arguments.
ScriptCall = tuple[Any, list[Any], list[Any]]

# running_calls(model): the model's running jobs by the database, with the seconds left of
# each one's lease; what the in-flight slots are rebuilt from after Redis lost them.
RunningCalls = Callable[[str], list[tuple[str, float]]]


def _script(client: redis.Redis, name: str, *libraries: str) -> Any:
    """lua/NAME.lua after the prelude and the `libraries` (lua/LIBRARY.lua: functions the
    scripts of one kind share)."""
    scripts = files("promptq.ratelimit").joinpath("lua")
    parts = ["prelude", *libraries, name]
    return client.register_script(
        "\n".join(scripts.joinpath(f"{part}.lua").read_text() for part in parts)
    )


def run_scripts(client: redis.Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run scripts in one round trip and return their replies: by their digests in a
    pipeline, then, for any Redis did not know (restarted, flushed), once more through the
    script object, which loads it. (redis-py's own pipelined scripts ask SCRIPT EXISTS
    first, a round trip more every time.)"""
    if len(calls) == 1:
        script, keys, args = calls[0]
        return [script(keys=keys, args=args)]
    with client.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        replies = pipe.execute(raise_on_error=False)
    for index, ((script, keys, args), reply) in enumerate(zip(calls, replies, strict=True)):
        if isinstance(reply, redis.exceptions.NoScriptError):
            replies[index] = script(keys=keys, args=args)
        elif isinstance(reply, Exception):
            raise reply
    return list(replies)


@dataclass(frozen=True)
class Adaptive:
    """How the effective rate follows the upstream's 429s: cut by `cut` at once (at most
    once per `debounce_seconds`, so calls in flight together count as one 429), then back
    over `recovery_seconds` to 95% of the rate that was refused, and beyond it only by
    `probe_per_10_minutes` of itself every ten minutes."""

    cut: float = 0.7
    floor: float = 0.02
    debounce_seconds: float = 0.5
    recovery_seconds: float = 20.0
    probe_per_10_minutes: float = 0.1
    # How long limits reported in anthropic-ratelimit-* headers stay in force unrefreshed.
    reported_ttl_seconds: float = 120.0

    @property
    def args(self) -> list[float]:
        """(recovery ms, probe per ms), as the scripts take them."""
        return [self.recovery_seconds * 1000, self.probe_per_10_minutes / 600_000]


class RedisLimiter(Limiter):
    """The Limiter (promptq.ratelimit.protocol) of a deployment: state in one Redis, shared
    by every worker process on every machine."""

    def __init__(
        self,
        client: redis.Redis,
        table: LimitTable,
        slot_lease_seconds: float = 30.0,
        adaptive: Adaptive | None = None,
        high_waiting_per_key: int = DEFAULT_HIGH_WAITING_PER_KEY,
        running_calls: RunningCalls | None = None,
    ) -> None:
        self.client = client
        self.running_calls = running_calls
        self.table = table
        self.slot_lease_ms = slot_lease_seconds * 1000
        # How many jobs one client key may have waiting at high priority for a model; its
        # next ones wait as normal, so that no key can starve the others with "high".
        self.high_waiting_per_key = high_waiting_per_key
        self.adaptive = adaptive or Adaptive()
        self._acquire = _script(client, "acquire")
        self._settle = _script(client, "settle")
        self._feedback = _script(client, "feedback")
        self._reserve = _script(client, "reserve")
        self._renew = _script(client, "renew")
        self._factor = _script(client, "factor")
        self._rebuild = _script(client, "rebuild")

    @staticmethod
    def keys(model: str) -> list[str]:
        base = model_limiter_base(model)
        return [
            f"{base}:state",
            f"{base}:inflight",
            f"{base}:waiting",
            f"{base}:costs",
            MODELS_WAITING,
            f"{base}:fair",
        ]

    @staticmethod
    def cache_marker(model: str, prefix: CachePrefix) -> str:
        """The key that says the upstream holds this prompt prefix in its cache."""
        return redis_keys.cache_marker(model, prefix.digest)

    def _limit_args(self, limits: ModelLimits) -> list[Any]:
        return [
            limits.rpm or 0,
            limits.input_tpm or 0,
            limits.output_tpm or 0,
            limits.max_concurrency or 0,
            limits.burst_seconds * 1000,
            self.slot_lease_ms,
            *self.adaptive.args,
        ]

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
        """Budget for a job that just arrived, or its place in the model's queue: behind
        the jobs waiting at its priority, taking turns with other client keys' jobs. Lost
        state is rebuilt first, or, with `rebuild=False`, RebuildNeeded is raised."""
        limits = self.table.limits_for(model)
        input_tokens = estimate_input_tokens(request)
        output_tokens = output_reservation(request)
        # Longest first: the script charges the prompt less the longest prefix it knows is
        # cached, since cache reads do not count as input (unless the upstream counts them).
        prefixes = [] if limits.count_cache_reads else cache_prefixes(request)[::-1]
        grant_id = uuid.uuid4().hex
        reply = self._admit(
            model,
            rebuild,
            keys=[*self.keys(model), *(self.cache_marker(model, p) for p in prefixes)],
            args=[
                "direct",
                model,
                job_id,
                input_tokens,
                output_tokens,
                Priority.named(priority).rank,
                *self._limit_args(limits),
                grant_id,
                _token_meter_ms(limits),
                client_key,
                self.high_waiting_per_key if high_waiting is None else high_waiting,
                *(p.tokens for p in prefixes),
            ],
        )
        verdict = _text(reply[0])
        if verdict == "granted":
            # The input charge as the script made it (less a cached prefix).
            charged = int(float(reply[3]))
            return Decision(grant=Grant(grant_id, model, charged, output_tokens))
        return Decision(waiting_for=_text(reply[1]), wait_seconds=float(reply[2]) / 1000)

    def dispatch(self, model: str) -> Dispatch:
        """Budget for the first job in the model's queue, if there is budget now."""
        grant_id = uuid.uuid4().hex
        limits = self.table.limits_for(model)
        reply = self._admit(
            model,
            True,
            keys=self.keys(model),
            args=[
                "head",
                model,
                "",
                0,
                0,
                1,
                *self._limit_args(limits),
                grant_id,
                _token_meter_ms(limits),
                "",
                self.high_waiting_per_key,
            ],
        )
        verdict = _text(reply[0])
        if verdict == "empty":
            return Dispatch(empty=True)
        if verdict == "denied":
            return Dispatch(wait_seconds=float(reply[2]) / 1000)
        job_id, rank = _text(reply[1]), int(reply[2])
        grant = Grant(grant_id, model, int(float(reply[3])), int(float(reply[4])))
        return Dispatch(job_id=job_id, priority=Priority.of_rank(rank), grant=grant)

    def _admit(self, model: str, rebuild: bool, keys: list[str], args: list[Any]) -> Any:
        """The acquire script's reply, the model's slots rebuilt first if it asks (or,
        without `rebuild`, RebuildNeeded)."""
        reply = self._acquire(keys=keys, args=args)
        if _text(reply[0]) == "rebuild":
            if not rebuild:
                raise RebuildNeeded(model)
            self.rebuild(model)
            reply = self._acquire(keys=keys, args=args)
        return reply

    def rebuild(self, model: str) -> int:
        """Put back a slot for each of the model's running jobs (by the database), unless
        another process did already; how many were put back."""
        running = self.running_calls(model) if self.running_calls is not None else []
        state, inflight = self.keys(model)[:2]
        args: list[Any] = []
        for job_id, seconds_left in running:
            # A stand-in lives as long as a slot: the call's worker renews its own slot well
            # within that, or is dead, and one that ended meanwhile frees it no later.
            args += [job_id, max(1.0, min(seconds_left * 1000, self.slot_lease_ms))]
        put_back = int(self._rebuild(keys=[state, inflight], args=args))
        if put_back:
            log.warning(
                "the rate limiter's Redis had lost %s's calls in flight: %d slots put back "
                "from the running jobs",
                model,
                put_back,
            )
        return put_back

    def queued(self, jobs: list[tuple[str, str]]) -> set[str]:
        """Which of these (job id, model) pairs wait in their model's queue."""
        with self.client.pipeline(transaction=False) as pipe:
            for job_id, model in jobs:
                # Every waiting job has its cost noted, whether or not it is its key's first.
                pipe.hexists(self.keys(model)[3], job_id)
            present = pipe.execute()
        return {job_id for (job_id, _), there in zip(jobs, present, strict=True) if there}

    def waiting_models(self) -> list[str]:
        return sorted(_text(m) for m in self.client.smembers(MODELS_WAITING))

    def settle(
        self,
        grant: Grant,
        usage: Usage | None,
        called: bool = True,
        request: Mapping[str, Any] | None = None,
    ) -> None:
        """Free the grant's slot and correct its token charges by what was really used.
        Given the request, a call that the upstream reports as caching its prompt marks the
        prompt's prefixes as cached, so that later calls are charged without them."""
        self._run([self._settle_call(grant, usage, called, request)])

    def finish(
        self,
        grant: Grant,
        usage: Usage | None,
        request: Mapping[str, Any] | None,
        headers: Mapping[str, str],
        throttled: bool,
        retry_after: float | None,
    ) -> None:
        """settle() and feedback() of a call that was made, in one round trip (a pipeline):
        the upstream's rate-limit headers come with every answer."""
        calls = [self._settle_call(grant, usage, True, request)]
        feedback = self._feedback_call(grant.model, headers, throttled, retry_after)[1]
        if feedback is not None:
            calls.append(feedback)
        self._run(calls)

    def _run(self, calls: list[ScriptCall]) -> None:
        run_scripts(self.client, calls)

    def _settle_call(
        self,
        grant: Grant,
        usage: Usage | None,
        called: bool,
        request: Mapping[str, Any] | None,
    ) -> ScriptCall:
        limits = self.table.limits_for(grant.model)
        refunds = refunds_of(grant, usage, called, limits)
        cached: list[CachePrefix] = []
        if (
            request is not None
            and usage is not None
            and not limits.count_cache_reads
            and (usage.cache_creation_input_tokens or usage.cache_read_input_tokens)
        ):
            cached = cache_prefixes(request)
        state, inflight = self.keys(grant.model)[:2]
        return (
            self._settle,
            [state, inflight, *(self.cache_marker(grant.model, p) for p in cached)],
            [
                grant.id,
                refunds[0],
                refunds[1],
                refunds[2],
                limits.rpm or 0,
                limits.input_tpm or 0,
                limits.output_tpm or 0,
                *self.adaptive.args,
                *(p.ttl_seconds * 1000 for p in cached),
            ],
        )

    def feedback(
        self, model: str, headers: Mapping[str, str], throttled: bool, retry_after: float | None
    ) -> ReportedLimits:
        """Tell every worker what the upstream said: a 429 pauses the model for its
        retry-after and cuts the rate; reported limits cap the configured ones; reported
        remaining tokens lower the token meters to them."""
        reported, call = self._feedback_call(model, headers, throttled, retry_after)
        if call is not None:
            self._run([call])
        return reported

    def _feedback_call(
        self, model: str, headers: Mapping[str, str], throttled: bool, retry_after: float | None
    ) -> tuple[ReportedLimits, ScriptCall | None]:
        reported = read_rate_limit_headers(headers)
        if not throttled and not reported.any:
            return reported, None
        limits = self.table.limits_for(model)
        configured = {"req": limits.rpm, "inp": limits.input_tpm, "out": limits.output_tpm}
        # Requests exhausted: wait for the reset. Tokens exhausted: the token meter drops to
        # empty (below) and refills at the rate, which is sooner than a token "reset" (the
        # time the bucket is full again); only a dimension with no limit known to turn
        # tokens into time is paused until its reset.
        pause_ms = max(
            (
                ms
                for dim, ms in reported.exhausted_ms.items()
                if dim == "req" or not (configured[dim] or reported.limit(dim))
            ),
            default=0.0,
        )
        if throttled:
            pause_ms = max(pause_ms, (retry_after if retry_after is not None else 1.0) * 1000)
        adaptive = self.adaptive
        return reported, (
            self._feedback,
            [self.keys(model)[0]],
            [
                pause_ms,
                1 if throttled else 0,
                adaptive.cut,
                adaptive.floor,
                adaptive.debounce_seconds * 1000,
                adaptive.args[0],
                adaptive.reported_ttl_seconds * 1000,
                reported.requests,
                reported.input_tokens,
                reported.output_tokens,
                adaptive.args[1],
                limits.input_tpm or 0,
                limits.output_tpm or 0,
                _token_meter_ms(limits),
                reported.remaining.get("inp", -1),
                reported.remaining.get("out", -1),
            ],
        )

    def renew(self, grants: Iterable[Grant], job_ids: Iterable[str] = ()) -> None:
        """Extend the slots of grants still held, putting back any Redis lost; `job_ids`,
        when given, are the grants' jobs, one each, whose stand-in slots from a rebuild
        the grants' own replace."""
        grants, job_ids = list(grants), list(job_ids)
        if grants:
            self._renew(
                keys=[self.keys(g.model)[1] for g in grants],
                args=[self.slot_lease_ms, *[g.id for g in grants], *job_ids],
            )

    def reserve_for_key(self, key_id: str, rpm: int, burst_seconds: float = 0.5) -> float:
        """Seconds until a job of this client key may go, its place in the key's rate
        taken now."""
        delay_ms = self._reserve(keys=[key_rate(key_id)], args=[rpm, burst_seconds * 1000])
        return float(delay_ms) / 1000

    def snapshot(self, model: str) -> dict[str, Any]:
        """The bucket as `promptq limits` shows it."""
        state_key, inflight, _, costs, *_ = self.keys(model)
        state = {_text(k): float(v) for k, v in self.client.hgetall(state_key).items()}
        seconds, micros = self.client.time()
        now = seconds * 1000 + micros / 1000
        factor = float(self._factor(keys=[state_key], args=self.adaptive.args))
        return {
            "model": model,
            "limits": self.table.limits_for(model).to_dict(),
            "factor": round(factor, 3),
            "paused_for_seconds": max(0.0, (state.get("paused_until", 0.0) - now) / 1000),
            "reported": {
                dim: int(state[f"cap:{dim}"])
                for dim in ("req", "inp", "out")
                if f"cap:{dim}" in state and state.get(f"capu:{dim}", 0) > now
            },
            "in_flight": self.client.zcount(inflight, now, "+inf"),
            "waiting": self.client.hlen(costs),
            "ahead_seconds": {
                dim: round(max(0.0, (state[f"tat:{dim}"] - now) / 1000), 3)
                for dim in ("req", "inp", "out")
                if f"tat:{dim}" in state
            },
        }

    def known_models(self) -> list[str]:
        models = set()
        for key in self.client.scan_iter(match=MODEL_STATE_PATTERN, count=500):
            models.add(model_of_state_key(_text(key)))
        return sorted(models)


# The token meters hold this share of the upstream's bucket. The rest absorbs the time
# between promptq charging a call and the call reaching the upstream, which differs from call
# to call: the upstream's bucket starts refilling at the first call's arrival, the meter at its
# grant, so a meter exactly as deep as the bucket runs a little ahead of it (a 429 on the
# call that empties both). 2% of a minute is 1.2 s of the rate; at the default depth the
# calls in flight at once are 2% fewer, the rate is the same.
TOKEN_METER_SHARE = 0.98


def _token_meter_ms(limits: ModelLimits) -> float:
    return limits.token_burst_seconds * 1000 * TOKEN_METER_SHARE


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
