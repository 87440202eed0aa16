"""The usage report: tokens and dollars of the jobs with a recorded cost, one row per model,
key or UTC day, for `GET /v1/usage` and `promptq usage`.

The database sums integer picodollars; they become Decimal once, here, so every row, and
the total, is exactly the sum of its jobs' recorded costs.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy.orm import Session

from promptq.periods import Period, isoformat_z
from promptq.pricing import format_usd
from promptq.reports.repository import GROUP_BYS, GroupBy, UsageRepository, UsageSums
from promptq.types import picodollars_to_usd

TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
# The parts of a cost, as a job's `cost` object names them, and the column each sums.
COST_PARTS = {
    "total": "cost_total",
    "input": "cost_input",
    "output": "cost_output",
    "cache_write": "cost_cache_write",
    "cache_read": "cost_cache_read",
}


@dataclass(frozen=True)
class UsageRow:
    group_by: GroupBy
    sums: UsageSums

    @property
    def label(self) -> str:
        """The group as one line of text: the model, the key's name and id, or the day."""
        if self.group_by == "key":
            key_id, name = self.sums.group
            return f"{name} ({key_id})"
        return self.sums.group[0]

    def group_value(self) -> Any:
        if self.group_by == "key":
            key_id, name = self.sums.group
            return {"id": key_id, "name": name}
        return self.sums.group[0]

    def to_api(self) -> dict[str, Any]:
        return {
            self.group_by: self.group_value(),
            "jobs": self.sums.jobs,
            "usage": {name: getattr(self.sums, name) for name in TOKEN_FIELDS},
            "cost": cost_to_api(self.sums),
        }


@dataclass(frozen=True)
class UsageReport:
    group_by: GroupBy
    period: Period
    key_id: str | None
    rows: list[UsageRow]

    @property
    def total(self) -> UsageSums:
        """Every row added up (in integers, so exactly)."""
        sums = {
            field.name: sum(getattr(row.sums, field.name) for row in self.rows)
            for field in fields(UsageSums)
            if field.name != "group"
        }
        return UsageSums(group=("total",), **sums)

    def to_api(self) -> dict[str, Any]:
        total = self.total
        return {
            "object": "usage",
            "group_by": self.group_by,
            "from": isoformat_z(self.period.start),
            "to": isoformat_z(self.period.end),
            "key_id": self.key_id,
            "data": [row.to_api() for row in self.rows],
            "total": {
                "jobs": total.jobs,
                "usage": {name: getattr(total, name) for name in TOKEN_FIELDS},
                "cost": cost_to_api(total),
            },
        }

    def to_csv(self) -> str:
        """A header row, then one row per group; money as plain decimal strings."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        group_columns = ["key_id", "key_name"] if self.group_by == "key" else [self.group_by]
        writer.writerow(
            [*group_columns, "jobs", *TOKEN_FIELDS, *(f"cost_{part}" for part in COST_PARTS)]
        )
        for row in self.rows:
            writer.writerow(
                [
                    *row.sums.group,
                    row.sums.jobs,
                    *(getattr(row.sums, name) for name in TOKEN_FIELDS),
                    *cost_parts(row.sums).values(),
                ]
            )
        return out.getvalue()


def cost_parts(sums: UsageSums) -> dict[str, str]:
    """The summed cost, total and parts, as decimal strings in USD."""
    return {
        part: format_usd(picodollars_to_usd(getattr(sums, column)))
        for part, column in COST_PARTS.items()
    }


def cost_to_api(sums: UsageSums) -> dict[str, str]:
    """The summed cost in the shape of a job's `cost`."""
    return {"currency": "USD", **cost_parts(sums)}


def usage_report(
    session: Session, group_by: GroupBy, period: Period, key_id: str | None = None
) -> UsageReport:
    if group_by not in GROUP_BYS:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BYS)}, got {group_by!r}")
    sums = UsageRepository(session).sums(group_by, period.start, period.end, key_id)
    return UsageReport(group_by, period, key_id, [UsageRow(group_by, row) for row in sums])
