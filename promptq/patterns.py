"""Model patterns: which entry of a table keyed by shell-style patterns applies to a model.

The price table and the rate-limit table are both keyed this way, so both resolve a model
with the same rule: the longest matching pattern wins, as the most specific one.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase


def longest_match(patterns: Iterable[str], model: str) -> str | None:
    """The longest of `patterns` that matches `model`, or None when none does.

    Matching is case-sensitive (`fnmatchcase`, not `fnmatch`, which folds case on some
    platforms): model IDs are lower-case, and a table must not behave differently on
    another OS. Between two matching patterns of the same length the first given wins, so
    that the outcome never depends on anything but the table's own order.
    """
    best: str | None = None
    for pattern in patterns:
        if (best is None or len(pattern) > len(best)) and fnmatchcase(model, pattern):
            best = pattern
    return best
