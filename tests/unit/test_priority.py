"""The one priority table: the limiter's ranks and the broker's message priorities derive
from it, and are the numbers they always were (messages and queued jobs of a running
release keep their places across an upgrade)."""

from __future__ import annotations

from promptq.priority import BROKER_PRIORITY_STEPS, Priority


def test_the_limiter_and_the_broker_serve_high_first() -> None:
    assert {p.value: p.rank for p in Priority} == {"high": 0, "normal": 1, "low": 2}
    assert {p.value: p.broker_priority for p in Priority} == {"high": 0, "normal": 3, "low": 6}
    assert BROKER_PRIORITY_STEPS == [0, 3, 6]


def test_an_unknown_name_or_rank_is_normal() -> None:
    assert Priority.named("urgent") is Priority.NORMAL
    assert Priority.named("low") is Priority.LOW
    assert Priority.of_rank(0) is Priority.HIGH
    assert Priority.of_rank(7) is Priority.NORMAL
