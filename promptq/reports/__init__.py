"""Reports over recorded jobs: usage (tokens and dollars) by model, key or day."""

from promptq.reports.repository import GROUP_BYS, GroupBy
from promptq.reports.service import UsageReport, UsageRow, usage_report

__all__ = ["GROUP_BYS", "GroupBy", "UsageReport", "UsageRow", "usage_report"]
