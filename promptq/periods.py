"""Calendar periods in UTC: the month a budget covers, the range a usage report reads.

Everything is UTC so that a month or a day means the same on every server, whatever its
local time zone; a report's `day` and a budget's reset are stated in UTC too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from promptq.clock import utcnow
from promptq.errors import InvalidRequest

EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
MAX_SPAN = timedelta(days=3660)


class PeriodError(InvalidRequest, ValueError):
    """A date or range that cannot be used; the message names it and says what to send."""


@dataclass(frozen=True)
class Period:
    """[start, end): start inclusive, end exclusive, both UTC."""

    start: datetime
    end: datetime


def month_start(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def month_key(moment: datetime) -> str:
    """The month of a moment, in UTC, as the ledgers key it: "YYYY-MM"."""
    return month_start(moment).strftime("%Y-%m")


def next_month_start(moment: datetime) -> datetime:
    start = month_start(moment)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def current_month(now: datetime | None = None) -> Period:
    now = now or utcnow()
    return Period(month_start(now), next_month_start(now))


def parse_moment(text: str, name: str) -> datetime:
    """A date (`2026-11-01`, midnight UTC) or an ISO 8601 datetime; one without an offset
    is taken as UTC."""
    text = text.strip()
    try:
        # A bare date parses as its midnight.
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise PeriodError(
            f"{name}: {text!r} is not a date (YYYY-MM-DD) or an ISO 8601 datetime "
            "(e.g. 2026-11-01T00:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def period_from(start: str | None, end: str | None, now: datetime | None = None) -> Period:
    """The range a report reads; it counts the hours that start within it (usage is kept
    by the hour, so a bound inside an hour leaves out the hour it falls in when it is
    `from`, and takes it in when it is `to`). Left out: `to` is the first day of next month
    (so, with `from` left out too, the current month); `from` is the first day of the month
    in which the range ends, so `to` alone means "that month, up to `to`"."""
    end_at = parse_moment(end, "to") if end else next_month_start(now or utcnow())
    if start:
        start_at = parse_moment(start, "from")
    else:
        start_at = month_start(end_at - timedelta(microseconds=1))
    if start_at >= end_at:
        raise PeriodError(
            f"from ({isoformat_z(start_at)}) must be before to ({isoformat_z(end_at)}); "
            "from is inclusive, to is exclusive"
        )
    # Absurd ranges are refused rather than summed: usage is kept by the hour, and a range
    # of centuries is a mistake (a year typed wrong), not a report anyone wants.
    for name, moment in (("from", start_at), ("to", end_at)):
        if not EARLIEST <= moment <= LATEST:
            raise PeriodError(
                f"{name}: {isoformat_z(moment)} is outside the years promptq can have "
                f"recorded ({EARLIEST.year} to {LATEST.year - 1})"
            )
    if end_at - start_at > MAX_SPAN:
        raise PeriodError(
            f"to: the range from {isoformat_z(start_at)} to {isoformat_z(end_at)} spans "
            f"{(end_at - start_at).days} days; a report covers at most {MAX_SPAN.days} days "
            "(ten years): ask for it in parts"
        )
    return Period(start_at, end_at)


def isoformat_z(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
