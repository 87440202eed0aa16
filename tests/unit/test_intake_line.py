"""api.intake_line: jobs posted while a batch is in its thread go together in the next;
each request gets its own outcome; a batch that fails fails only its own requests. No
processes: the line's `accept` here is a function of the test's, run in the line's thread."""

from __future__ import annotations

import asyncio
import threading
import traceback
from collections.abc import Sequence
from typing import Any

import pytest

from api.intake_line import IntakeLine, Outcome


class Acceptor:
    """Answers every ticket with its name, or with the error the test asked for; holds the
    first batch in its thread until `release` when told to."""

    def __init__(self, hold_first: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.refuse: set[str] = set()
        self.fail_batches_with: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, tickets: Sequence[str]) -> list[Outcome]:
        self.batches.append(list(tickets))
        self.entered.set()
        self.release.wait(10)
        if self.fail_batches_with & set(tickets):
            raise RuntimeError("the database went away")
        return [
            ValueError(f"refused {ticket}") if ticket in self.refuse else {"id": ticket}
            for ticket in tickets
        ]


async def _until(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the line never got there")


async def _hold_then_post(
    line: IntakeLine[str], acceptor: Acceptor, first: str, then: list[str]
) -> list[Any]:
    """Post `first`; once its batch is in the thread, post `then`; let the first go."""
    tasks = [asyncio.create_task(line.take_in(first))]
    await _until(acceptor.entered.is_set)
    tasks += [asyncio.create_task(line.take_in(ticket)) for ticket in then]
    await _until(lambda: len(line._waiting) == len(then))
    acceptor.release.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_a_job_posted_alone_goes_at_once_alone() -> None:
    acceptor = Acceptor()
    line: IntakeLine[str] = IntakeLine(acceptor)
    assert asyncio.run(line.take_in("a")) == {"id": "a"}
    assert acceptor.batches == [["a"]]


def test_jobs_posted_while_a_batch_is_out_go_together_next() -> None:
    acceptor = Acceptor(hold_first=True)
    line: IntakeLine[str] = IntakeLine(acceptor)
    answers = asyncio.run(_hold_then_post(line, acceptor, "a", ["b", "c", "d"]))
    assert answers == [{"id": name} for name in "abcd"]
    assert acceptor.batches == [["a"], ["b", "c", "d"]]


def test_a_batch_takes_at_most_its_share_in_order_of_arrival() -> None:
    acceptor = Acceptor(hold_first=True)
    line: IntakeLine[str] = IntakeLine(acceptor, most_at_once=2)
    answers = asyncio.run(_hold_then_post(line, acceptor, "a", ["b", "c", "d", "e", "f"]))
    assert answers == [{"id": name} for name in "abcdef"]
    assert acceptor.batches == [["a"], ["b", "c"], ["d", "e"], ["f"]]


def test_a_job_refused_is_refused_alone() -> None:
    acceptor = Acceptor(hold_first=True)
    acceptor.refuse = {"c"}
    line: IntakeLine[str] = IntakeLine(acceptor)
    answers = asyncio.run(_hold_then_post(line, acceptor, "a", ["b", "c", "d"]))
    assert answers[:2] == [{"id": "a"}, {"id": "b"}]
    assert isinstance(answers[2], ValueError) and str(answers[2]) == "refused c"
    assert answers[3] == {"id": "d"}


def test_a_batch_that_fails_fails_its_own_requests_and_the_line_goes_on() -> None:
    acceptor = Acceptor(hold_first=True)
    acceptor.fail_batches_with = {"c"}
    line: IntakeLine[str] = IntakeLine(acceptor)

    async def scenario() -> tuple[list[Any], Any]:
        answers = await _hold_then_post(line, acceptor, "a", ["b", "c"])
        return answers, await line.take_in("d")

    answers, later = asyncio.run(scenario())
    assert answers[0] == {"id": "a"}
    assert all(isinstance(answer, RuntimeError) for answer in answers[1:])
    assert later == {"id": "d"}
    assert acceptor.batches == [["a"], ["b", "c"], ["d"]]


def test_the_requests_of_a_failed_batch_do_not_pile_tracebacks_onto_its_error() -> None:
    """Every request of a failed batch raises the one error object; each raise starts from
    the traceback it was set with (asyncio keeps it with the future), so a long outage does
    not make each logged traceback longer than the last."""
    acceptor = Acceptor()
    acceptor.fail_batches_with = {"a"}
    line: IntakeLine[str] = IntakeLine(acceptor, most_at_once=5)
    depths: list[int] = []

    async def post(ticket: str) -> None:
        try:
            await line.take_in(ticket)
        except RuntimeError as error:
            depths.append(len(traceback.extract_tb(error.__traceback__)))

    async def scenario() -> None:
        await asyncio.gather(*(post(ticket) for ticket in "abcde"))

    asyncio.run(scenario())
    assert acceptor.batches == [["a", "b", "c", "d", "e"]]
    assert len(depths) == 5 and len(set(depths)) == 1


def test_a_request_that_goes_away_leaves_the_others_answered() -> None:
    acceptor = Acceptor(hold_first=True)
    line: IntakeLine[str] = IntakeLine(acceptor)

    async def scenario() -> list[Any]:
        first = asyncio.create_task(line.take_in("a"))
        await _until(acceptor.entered.is_set)
        gone = asyncio.create_task(line.take_in("b"))
        stays = asyncio.create_task(line.take_in("c"))
        await _until(lambda: len(line._waiting) == 2)
        gone.cancel()
        acceptor.release.set()
        return await asyncio.gather(first, gone, stays, return_exceptions=True)

    first, gone, stays = asyncio.run(scenario())
    assert first == {"id": "a"} and stays == {"id": "c"}
    assert isinstance(gone, asyncio.CancelledError)
    # Taken in all the same, as a request whose client left mid-way always was.
    assert acceptor.batches == [["a"], ["b", "c"]]


@pytest.mark.parametrize("most_at_once", [1, 64])
def test_every_request_is_answered_under_a_flood(most_at_once: int) -> None:
    acceptor = Acceptor()
    line: IntakeLine[str] = IntakeLine(acceptor, most_at_once=most_at_once)

    async def flood() -> list[Any]:
        return await asyncio.gather(*(line.take_in(str(n)) for n in range(300)))

    assert asyncio.run(flood()) == [{"id": str(n)} for n in range(300)]
    taken = [ticket for batch in acceptor.batches for ticket in batch]
    assert taken == [str(n) for n in range(300)]
    assert max(len(batch) for batch in acceptor.batches) <= most_at_once
