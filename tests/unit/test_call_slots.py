"""CallSlots, the calls a worker process keeps in flight, with real threads (a worker's
greenlets use the same code, patched): who waits, who is woken, in what order, and what a
closed one tells the jobs still waiting."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from promptq.jobs.call_slots import CallSlots, ShuttingDown

PATIENCE = 5.0


def eventually(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PATIENCE
    while not check():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.005)


def start(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_a_job_past_the_limit_waits_until_a_call_gives_its_slot_back() -> None:
    slots = CallSlots(2)
    first, second = slots.slot(), slots.slot()
    held = [first.__enter__(), second.__enter__()]
    got: list[str] = []

    def third() -> None:
        with slots.slot():
            got.append("third")

    waiting = start(third)
    eventually(lambda: slots.waiting == 1)
    assert got == [] and slots.in_use == 2

    held[0].release()  # the first call's answer is in: its job records without a slot
    waiting.join(PATIENCE)
    assert got == ["third"]
    first.__exit__(None, None, None)  # the first job's end gives nothing back twice
    assert slots.in_use == 1
    second.__exit__(None, None, None)
    assert slots.in_use == 0


def test_waiting_jobs_get_their_slots_in_the_order_they_came() -> None:
    slots = CallSlots(1)
    gate = slots.slot()
    gate.__enter__()
    order: list[int] = []
    waiters = []
    for number in range(5):
        waiters.append(start(lambda number=number: _take_and_note(slots, order, number)))
        # Each waiting before the next starts: the order they came in is known.
        eventually(lambda count=number + 1: slots.waiting == count)
    gate.__exit__(None, None, None)
    for waiter in waiters:
        waiter.join(PATIENCE)
    assert order == [0, 1, 2, 3, 4]


def _take_and_note(slots: CallSlots, order: list[int], number: int, rank: int = 0) -> None:
    with slots.slot(rank=rank):
        order.append(number)


def test_a_waiting_job_of_a_lower_rank_goes_first_then_each_rank_in_the_order_it_came() -> None:
    slots = CallSlots(1)
    gate = slots.slot()
    gate.__enter__()
    order: list[int] = []
    ranks = [6, 6, 0, 3, 0]  # the broker's priorities: high 0, normal 3, low 6
    waiters = []
    for number, rank in enumerate(ranks):
        waiters.append(start(lambda n=number, r=rank: _take_and_note(slots, order, n, r)))
        eventually(lambda count=number + 1: slots.waiting == count)
    gate.__exit__(None, None, None)
    for waiter in waiters:
        waiter.join(PATIENCE)
    assert order == [2, 4, 3, 0, 1]
    assert slots.in_use == 0 and slots.waiting == 0


def test_a_slot_given_back_goes_to_the_line_not_to_a_job_that_comes_after() -> None:
    slots = CallSlots(1)
    gate = slots.slot()
    gate.__enter__()
    order: list[str] = []
    waiter = start(lambda: _take_and_note_named(slots, order, "waiting"))
    eventually(lambda: slots.waiting == 1)
    gate.__exit__(None, None, None)
    # Handed over as it was given back, before the waiting thread even ran: still in use,
    # so whoever asks now, even of a lower rank, waits its turn.
    assert slots.in_use == 1 and slots.waiting == 0
    late = start(lambda: _take_and_note_named(slots, order, "late", rank=-1))
    waiter.join(PATIENCE)
    late.join(PATIENCE)
    assert order == ["waiting", "late"]


def _take_and_note_named(slots: CallSlots, order: list[str], name: str, rank: int = 0) -> None:
    with slots.slot(rank=rank):
        order.append(name)
        time.sleep(0.05)


def test_closing_tells_every_waiting_job_and_every_later_one_to_give_up() -> None:
    slots = CallSlots(1)
    running = slots.slot()
    running.__enter__()
    outcomes: list[str] = []

    def waiting_job() -> None:
        try:
            with slots.slot():
                outcomes.append("ran")
        except ShuttingDown:
            outcomes.append("gave up")

    waiters = [start(waiting_job) for _ in range(3)]
    eventually(lambda: slots.waiting == 3)
    slots.close()
    for waiter in waiters:
        waiter.join(PATIENCE)
    assert outcomes == ["gave up"] * 3
    # Even with a slot free, a job that comes after the close starts nothing.
    running.__exit__(None, None, None)
    with pytest.raises(ShuttingDown), slots.slot():
        pass


def test_a_job_holding_rate_limit_budget_still_runs_after_the_close() -> None:
    slots = CallSlots(1)
    running = slots.slot()
    running.__enter__()
    ran: list[str] = []

    def granted_job() -> None:
        with slots.slot(even_when_closed=True):
            ran.append("granted")

    def standby_job() -> None:
        try:
            with slots.slot(rank=-1):
                ran.append("standby")
        except ShuttingDown:
            ran.append("standby gave up")

    waiter = start(granted_job)
    eventually(lambda: slots.waiting == 1)
    standby = start(standby_job)  # ahead of it by rank, but not after the close
    eventually(lambda: slots.waiting == 2)
    slots.close()
    standby.join(PATIENCE)
    assert ran == ["standby gave up"]
    assert slots.waiting == 1  # closed, yet the granted job waits for its slot as before
    running.__exit__(None, None, None)
    waiter.join(PATIENCE)
    assert ran == ["standby gave up", "granted"]
    assert slots.in_use == 0


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one call"):
        CallSlots(0)
