"""The sweeper's decision, which lost messages to publish again, against in-memory
implementations of the protocols promptq.jobs.sweeping defines (no processes). The real
broker's side is tested end to end in test_end_to_end.py."""

from __future__ import annotations

from collections.abc import Sequence

from promptq.jobs.sweeping import Candidate, StalePass, republish_lost


class MemoryBroker:
    """promptq.jobs.sweeping.Broker: job ids with a live marker; a backlog while any."""

    def __init__(self, marked: set[str]) -> None:
        self.marked = marked
        self.published: list[tuple[str, str]] = []

    def has_backlog(self) -> bool:
        return bool(self.marked)

    def unpublished(self, job_ids: Sequence[str]) -> list[str]:
        return [job_id for job_id in job_ids if job_id not in self.marked]

    def publish_jobs(self, jobs: Sequence[Candidate]) -> None:
        self.published += [(job.id, job.priority) for job in jobs]


class MemoryQueue:
    """promptq.jobs.sweeping.RateLimitQueue: the job ids waiting for budget."""

    def __init__(self, waiting: set[str]) -> None:
        self.waiting = waiting

    def queued(self, jobs: list[tuple[str, str]]) -> set[str]:
        return {job_id for job_id, _ in jobs if job_id in self.waiting}


MARKED = Candidate("job_marked", "normal", "m")
UNMARKED = Candidate("job_unmarked", "high", "m")
WAITING = Candidate("job_waiting", "low", "m")  # no marker, but in its model's queue
ALL = [MARKED, UNMARKED, WAITING]


def test_with_a_backlog_a_live_marker_or_a_rate_limit_queue_accounts_for_a_job() -> None:
    broker = MemoryBroker({MARKED.id})
    lost = republish_lost(ALL, broker, MemoryQueue({WAITING.id}), backlog=True)
    assert lost == [UNMARKED]
    assert broker.published == [(UNMARKED.id, "high")]


def test_with_the_broker_empty_a_marker_accounts_for_nothing() -> None:
    # A worker killed between taking a message and recording it leaves a live marker and
    # no message: with nothing in the broker, the marker cannot be believed.
    broker = MemoryBroker({MARKED.id})
    lost = republish_lost(ALL, broker, MemoryQueue({WAITING.id}), backlog=False)
    assert lost == [MARKED, UNMARKED]
    assert broker.published == [(MARKED.id, "normal"), (UNMARKED.id, "high")]


def test_nothing_lost_publishes_nothing() -> None:
    broker = MemoryBroker({MARKED.id, UNMARKED.id})
    assert republish_lost(ALL, broker, MemoryQueue({WAITING.id}), backlog=True) == []
    assert republish_lost([], broker, MemoryQueue(set()), backlog=False) == []
    assert broker.published == []


def test_a_pass_that_ran_out_of_budget_with_jobs_lost_goes_on_at_once() -> None:
    assert StalePass([UNMARKED], cursor=UNMARKED.id).drain_now
    assert not StalePass([], cursor=MARKED.id).drain_now  # a long backlog: wait for the tick
    assert not StalePass([UNMARKED], cursor=None).drain_now  # went all the way round
