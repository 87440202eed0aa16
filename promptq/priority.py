"""A job's priority, and what it means to each part that orders jobs: the one table.

The limiter's queue of waiting jobs and the broker's queues both serve the lowest number
first; both numbers derive from the order the priorities are declared in here.
"""

from __future__ import annotations

from enum import StrEnum

# Celery's Redis transport keeps one list per priority step and rounds a message's priority
# to a step; a step apart per priority leaves room for one between two, should it be needed.
BROKER_PRIORITY_STEP = 3


class Priority(StrEnum):
    """Declared in the order jobs are served: high first."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @classmethod
    def named(cls, name: str) -> Priority:
        """The priority of that name; normal for a name none has (as both the limiter and
        the broker have always taken one)."""
        try:
            return cls(name)
        except ValueError:
            return cls.NORMAL

    @classmethod
    def of_rank(cls, rank: int) -> Priority:
        """The priority at that place in the limiter's queue; normal for an unknown one."""
        ranked = list(cls)
        return ranked[rank] if 0 <= rank < len(ranked) else cls.NORMAL

    @property
    def rank(self) -> int:
        """Its place in the limiter's queue of waiting jobs: 0 is served first."""
        return list(Priority).index(self)

    @property
    def broker_priority(self) -> int:
        """The priority of its messages on the broker: with Redis, 0 is served first
        (AMQP's convention inverted)."""
        return self.rank * BROKER_PRIORITY_STEP


# The broker's priority steps, for the Redis transport's `priority_steps`.
BROKER_PRIORITY_STEPS = sorted(priority.broker_priority for priority in Priority)
