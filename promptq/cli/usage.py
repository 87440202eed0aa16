"""`promptq usage`: the operator's usage report, read from the database itself."""

from __future__ import annotations

import json
from decimal import Decimal

import click

from promptq.config import get_settings
from promptq.db import session_scope
from promptq.periods import PeriodError, isoformat_z, period_from
from promptq.reports import GROUP_BYS, GroupBy, UsageReport, usage_report
from promptq.reports.repository import UsageSums
from promptq.reports.service import cost_parts

HEADERS = ("JOBS", "INPUT", "OUTPUT", "CACHE WRITE", "CACHE READ", "COST (USD)")


@click.command("usage")
@click.option(
    "--by",
    "group_by",
    type=click.Choice(GROUP_BYS),
    default="model",
    show_default=True,
    help="One row per model, key or UTC day.",
)
@click.option("--from", "start", help="Inclusive: a date (2026-11-01) or ISO datetime, UTC.")
@click.option("--to", "end", help="Exclusive: a date or ISO datetime, UTC.")
@click.option("--key", "key_id", help="Only this key's jobs (its id).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as GET /v1/usage does.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV with a header row.")
def usage(
    group_by: GroupBy,
    start: str | None,
    end: str | None,
    key_id: str | None,
    as_json: bool,
    as_csv: bool,
) -> None:
    """Tokens and dollars of the jobs with a recorded cost, by model, key or day.

    Without --from and --to: the current calendar month (UTC). Jobs count by when they
    finished; --from is inclusive, --to exclusive.
    """
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    try:
        period = period_from(start, end)
    except PeriodError as exc:
        raise click.BadParameter(str(exc)) from None
    with session_scope(get_settings()) as session:
        report = usage_report(session, group_by, period, key_id)
    if as_json:
        click.echo(json.dumps(report.to_api(), indent=2))
    elif as_csv:
        click.echo(report.to_csv(), nl=False)
    else:
        click.echo(render_table(report))


def render_table(report: UsageReport) -> str:
    """An aligned table with a total line; costs exact, their decimal points aligned."""
    span = f"{isoformat_z(report.period.start)} to {isoformat_z(report.period.end)} (exclusive)"
    scope = f", key {report.key_id}" if report.key_id else ""
    title = f"usage by {report.group_by}, {span}{scope}"
    if not report.rows:
        return f"{title}\nno jobs with a recorded cost in this period"
    body = [(row.label, *_figures(row.sums)) for row in report.rows]
    total = ("TOTAL", *_figures(report.total))
    costs = _aligned([line[-1] for line in [*body, total]])
    lines = [(*line[:-1], cost) for line, cost in zip([*body, total], costs, strict=True)]
    header = (report.group_by.upper(), *HEADERS)
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]

    def render(line: tuple[str, ...]) -> str:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join(
        [
            title,
            "",
            render(header),
            rule,
            *(render(line) for line in lines[:-1]),
            rule,
            render(lines[-1]),
        ]
    )


def _figures(sums: UsageSums) -> tuple[str, ...]:
    return (
        f"{sums.jobs:,}",
        f"{sums.input_tokens:,}",
        f"{sums.output_tokens:,}",
        f"{sums.cache_creation_input_tokens:,}",
        f"{sums.cache_read_input_tokens:,}",
        cost_parts(sums)["total"],
    )


def _aligned(amounts: list[str]) -> list[str]:
    """Decimal strings padded with zeros to the same number of places: exact, and aligned
    on the decimal point once right-justified."""
    places = max(_places(amount) for amount in amounts)
    quantum = Decimal(1).scaleb(-places)
    return [format(Decimal(amount).quantize(quantum), "f") for amount in amounts]


def _places(amount: str) -> int:
    exponent = Decimal(amount).as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0
