"""One delivery of a job, from message to recorded attempt.

The common job (due, its key neither revoked nor held to an rpm) is claimed first, in one
statement that also reads what running it needs (JobRepository.claim_ready), then admitted
by its model's limits in the claim's transaction: a job that must wait joins the model's
queue in Redis, its claim is rolled back and it is marked waiting, and its message is done.
Then called, then recorded in one transaction (on PostgreSQL one statement,
promptq.jobs.recording): two transactions, a handful of statements, per job.

Any other job goes the long way: checked first (still runnable, due, its key not revoked),
then admitted (its key's rpm, then the model's limits), then claimed (compare-and-set).
Budget that was granted but not used is given back.

What the transactions set off (a retry's message, the word to clients held open on the job,
its webhook deliveries) is recorded on their sessions and sent by the runner's messenger
once each commits (promptq.outbox). The runner's own "come back in N seconds" (a job
delivered early, a key's rpm) it sends itself through the same messenger: nothing is
written that the message would have to follow.
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from promptq import budgets
from promptq.clock import utcnow
from promptq.config import Settings
from promptq.db import session_scope
from promptq.jobs.call_slots import CallSlot, CallSlots
from promptq.jobs.execution import (
    ClaimedJob,
    Refusal,
    RunnableJob,
    cancel_for_revoked_key,
    claim_job,
    claim_ready_job,
    deliver_to_subscribers,
    mark_waiting,
    record_attempt,
    records_alone,
    reserve_budget,
    runnable_job,
)
from promptq.jobs.leases import LeaseKeeper
from promptq.jobs.repository import KEY_RPM
from promptq.outbox import Messenger
from promptq.pricing import PriceTable
from promptq.ratelimit.protocol import Decision, Grant, Limiter, RebuildNeeded
from promptq.record_retrying import RECORD_RETRYING
from promptq.upstream import UpstreamResult
from promptq.usage import Usage
from promptq.webhooks.deliveries import DeliveryRoom

log = logging.getLogger(__name__)

# No bound of the runner's own on the calls in flight.
UNBOUNDED_CALLS = 1 << 30
# A reservation this close is not worth a round trip through the broker.
NEGLIGIBLE_DELAY_SECONDS = 0.05


class Upstream(Protocol):
    """The one call a job makes: promptq.upstream.UpstreamClient over HTTP in a worker."""

    def create_message(self, params: dict[str, Any], beta: str | None = None) -> UpstreamResult:
        """Never raises: whatever happens is in the result."""
        ...


@dataclass
class JobRunner:
    settings: Settings
    prices: PriceTable
    upstream: Upstream
    limiter: Limiter
    leases: LeaseKeeper
    messenger: Messenger
    # The calls this process keeps in flight (its concurrency). Unbounded unless given: a
    # caller running one job at a time needs none.
    call_slots: CallSlots = field(default_factory=lambda: CallSlots(UNBOUNDED_CALLS))
    # Where the job's end may send its webhook deliveries' first attempts itself (the
    # worker's delivery pool); none: they are published, for any sender to claim.
    delivery_room: DeliveryRoom | None = None
    # How many of its jobs record their answer at once (PROMPTQ_WORKER_RECORDS_AT_ONCE;
    # in a worker, its webhook deliveries' records take the same turns:
    # worker.delivery_sending); the others wait, about in the order their answers came,
    # and a job about to start waits behind them. None: no turns, for a caller that runs
    # one job at a time. About: the standard library's semaphore wakes its longest
    # waiter, but a newcomer that runs first takes the turn given back, and the woken one
    # waits again.
    #
    # Calls started together end together (a burst, answers of one length). Under gevent a
    # greenlet that waits for I/O goes to the back of the line of every greenlet ready to
    # run, so the jobs of such a wave recorded in lock-step, each statement, each hand-over
    # of a webhook delivery, a turn of the whole wave and of the calls replacing them, and
    # the first answer's job ended when the last one's did. Taking turns, the jobs waiting
    # are parked out of that line, and each records and hands its deliveries over in a few
    # short waits, first come first done: a delivery's median delay down by half or more,
    # and the webhook p95 lower with the starts behind them, at about 4% more worker CPU
    # a job (docs/benchmarks.md, "Record turns", for the runs and their figures). A
    # turn is one attempt of the record: one that fails gives it back before it waits to
    # try again, so a record waiting out a database outage keeps no other from trying.
    record_turns: threading.Semaphore | None = None

    def run(self, job_id: str, grant: Grant | None = None, rank: int = 0) -> str:
        """The job's delivery, once a call slot is free (waiting ones served by `rank`, its
        message's priority on the broker: lower first). Raises ShuttingDown
        (promptq.jobs.call_slots) when the worker began stopping before the job got one
        and it holds no rate-limit grant: nothing was done, and its message goes back."""
        with self.call_slots.slot(even_when_closed=grant is not None, rank=rank) as slot:
            return self._run(job_id, grant, slot)

    def _run(self, job_id: str, grant: Grant | None, slot: CallSlot) -> str:
        # Behind the answers that came before it (record_turns): in a wave of answers, the
        # jobs ending record and hand their webhooks over before the calls replacing them
        # claim, call and parse on the same core.
        with self._record_turn():
            pass
        try:
            started = self._start_ready(job_id, grant)
        except RebuildNeeded as needed:
            # The claim was rolled back: rebuilt here, with no transaction open, then the
            # job's way again (the state is there now, or another process rebuilt it).
            self.limiter.rebuild(needed.model)
            started = self._start_ready(job_id, grant)
        if started is None:
            return self._run_checked(job_id, grant, slot)
        if isinstance(started, str):
            return started
        job, claimed, grant = started
        return self._call(job, claimed, grant, slot)

    def _start_ready(
        self, job_id: str, grant: Grant | None
    ) -> tuple[RunnableJob, ClaimedJob, Grant] | str | None:
        """The common job's way: claimed in one statement, then admitted (its model's
        limits, in the claim's transaction: a job that must wait is rolled back to where
        it was and marked waiting), its budget reserved, one commit. None when it was not
        claimed: the long way (_run_checked) finds out why."""
        refused: Refusal | None = None
        given = grant
        try:
            with session_scope(self.settings, self.messenger) as session:
                ready = claim_ready_job(session, self.settings, job_id)
                if ready is None:
                    return None
                job, claimed = ready
                if grant is None:
                    # Never a rebuild of lost limiter state here, inside the claim's
                    # transaction: it reads the database (RebuildNeeded, above).
                    decision = self._acquire(job, rebuild=False)
                    if decision.grant is None:
                        # The claim never happened: the job waits as it was, for budget.
                        session.rollback()
                        mark_waiting(session, job.id, decision.waiting_for or "queue")
                        return "waiting"
                    grant = decision.grant
                if claimed.budgeted:
                    # In the claim's transaction: a job runs only with its cost reserved.
                    refused = reserve_budget(session, self.settings, self.prices, claimed)
        except BaseException:
            # Rolled back, so not claimed: budget granted here goes back (a dispatcher's
            # grant stays with the message, which is tried again).
            if grant is not given:
                self._give_back(grant)
            raise
        if refused is not None:
            self._give_back(grant)
            log.info("job %s: %s", job_id, refused.message)
            return "budget exceeded"
        return job, claimed, grant

    def _run_checked(self, job_id: str, grant: Grant | None, slot: CallSlot) -> str:
        """The long way: the job read first, then what keeps it from running now decided
        (gone, its key revoked, not yet due, its key's rpm, its model's limits), then the
        claim."""
        with session_scope(self.settings, self.messenger) as session:
            job = runnable_job(session, job_id)
        if job is None:
            self._give_back(grant)
            return "nothing to do"
        if job.key_revoked:
            self._give_back(grant)
            with session_scope(self.settings, self.messenger) as session:
                cancel_for_revoked_key(session, job.id)
            return "key revoked"
        if job.due_in > 0:
            # Delivered early (a duplicate, or clocks apart): come back when it is due.
            self._give_back(grant)
            self.messenger.publish_job(job.id, job.priority, job.due_in)
            return "not due"
        if grant is None:
            admitted = self._admit(job)
            if admitted is None:
                return "waiting"
            grant = admitted
        refused: Refusal | None = None
        with session_scope(self.settings, self.messenger) as session:
            claimed = claim_job(session, self.settings, job)
            if claimed is not None and claimed.budgeted:
                # In the claim's transaction: a job runs only with its cost reserved.
                refused = reserve_budget(session, self.settings, self.prices, claimed)
        if claimed is None:
            self._give_back(grant)
            return "claimed elsewhere"
        if refused is not None:
            self._give_back(grant)
            log.info("job %s: %s", job.id, refused.message)
            return "budget exceeded"
        return self._call(job, claimed, grant, slot)

    def _admit(self, job: RunnableJob) -> Grant | None:
        if job.key_rpm and job.attempts == 0 and job.waiting_for != KEY_RPM:
            delay = self.limiter.reserve_for_key(job.api_key_id, job.key_rpm)
            if delay > NEGLIGIBLE_DELAY_SECONDS:
                with session_scope(self.settings, self.messenger) as session:
                    mark_waiting(session, job.id, KEY_RPM, utcnow() + timedelta(seconds=delay))
                self.messenger.publish_job(job.id, job.priority, delay)
                return None
        decision = self._acquire(job)
        if decision.grant is None:
            with session_scope(self.settings, self.messenger) as session:
                mark_waiting(session, job.id, decision.waiting_for or "queue")
        return decision.grant

    def _acquire(self, job: RunnableJob, rebuild: bool = True) -> Decision:
        return self.limiter.acquire(
            job.id,
            job.model,
            job.request,
            job.priority,
            client_key=job.api_key_id,
            high_waiting=job.key_high_priority_waiting,
            rebuild=rebuild,
        )

    def _call(self, job: RunnableJob, claimed: ClaimedJob, grant: Grant, slot: CallSlot) -> str:
        with self.leases.holding(job.id, grant):
            result = self.upstream.create_message(claimed.request, beta=claimed.anthropic_beta)
            answered_at = utcnow()
            # The answer is recorded first, and waited for through a database outage: it
            # was paid for, and losing it would mean asking the upstream again.
            alone = records_alone(self.settings, claimed)
            # Only a record that commits as it runs hands deliveries over: once it has run,
            # nothing is left to fail and leave them claimed but never sent.
            room = self.delivery_room if alone else None
            for retrying in RECORD_RETRYING:
                with (
                    retrying,
                    self._record_turn(),
                    session_scope(self.settings, self.messenger, autocommit=alone) as session,
                ):
                    verdict = record_attempt(
                        session, self.settings, self.prices, claimed, result, room, answered_at
                    )
                    if room is not None:
                        # Committed as it ran; handed over before the session sends its
                        # messages (the word to clients waiting on the job), whose Redis
                        # round trip would otherwise come first: in a burst of jobs ending
                        # together each wait for I/O puts a greenlet behind all the others.
                        for prepared in verdict.handed_over:
                            room.hand_over(prepared)
                    if claimed.budgeted:
                        budgets.release(session, [claimed.id])
            # The slot goes back once the answer is recorded and its deliveries handed
            # over, not when the answer is in: jobs that end together (a wave of calls
            # started together) then record and send their webhooks before the calls that
            # replace them claim, call and parse, all on this process's one core. In
            # alternating runs of bench/webhook_delay.py, first delivery p95 was 122 to
            # 237 ms (median 145) against 161 to 282 (median 228) with the slot given back
            # first; concurrency 100 at 1 s made 92 and 95 jobs/s against 97 and 97, each
            # slot idle through its record, a cost that shrinks as answers take longer.
            slot.release()
            if verdict.subscribers_owed:
                for retrying in RECORD_RETRYING:
                    with retrying, session_scope(self.settings, self.messenger) as session:
                        deliver_to_subscribers(session, job.id)
        log.info(
            "job %s attempt %d: %s (upstream %s, %d ms)",
            job.id,
            claimed.attempt,
            verdict.status,
            result.status_code,
            result.latency_ms,
            extra={"job_id": job.id, "attempt": claimed.attempt, "model": job.model},
        )
        try:
            usage = Usage.from_message(result.message) if result.message else None
            self.limiter.finish(
                grant,
                usage,
                claimed.request,
                result.rate_limit_headers,
                throttled=result.status_code == 429,
                retry_after=result.retry_after,
            )
        except Exception:
            # Left unsettled, the slot frees itself when its lease runs out.
            log.exception(
                "could not settle the rate-limit grant of job %s", job.id, extra={"job_id": job.id}
            )
        return str(verdict.status)

    def _record_turn(self) -> AbstractContextManager[object]:
        return self.record_turns if self.record_turns is not None else nullcontext()

    def _give_back(self, grant: Grant | None) -> None:
        if grant is not None:
            self.limiter.settle(grant, None, called=False)
