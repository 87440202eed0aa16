"""Two commits of promptq under one benchmark, in alternating rounds: a change told from the hour.

    .venv/bin/python bench/alternate.py --base 51f25d4 --rounds 6 --measure p95 \\
        -- bench/webhook_delay.py
    .venv/bin/python bench/alternate.py --base HEAD~1 --measure "Worker CPU per job" \\
        -- bench/throughput.py --skip-intake --latency 0 --e2e-jobs 5000

The boxes these benchmarks run on are shared: the same code runs up to twice as fast on one
hour as on another, and drifts within the hour too (docs/benchmarks.md). So two commits are
compared by turns, in the order ABBA (this checkout, the base, the base, this checkout, ...),
so that a drift through the rounds weighs on both alike, and by the median and the count of
rounds each side won, not by one run of each.

The base is checked out in a temporary git worktree (removed at the end) and run with this
checkout's Python, PYTHONPATH set to it, so that the API and worker processes the script
starts run the base's code; each side runs its own copy of the script. A base whose
dependencies differ from this checkout's needs an environment of its own: not handled here.
Each run's stdout, the script's Markdown, is read for the rows named by --measure (a table
row whose first cell is the measure, or starts with it): the first number of its second
cell. The scripts' progress goes to stderr as they run; stdout is a Markdown table of every
round, the medians, and in how many rounds this checkout's figure was the lower.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table

REPO = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Side:
    label: str
    checkout: Path


def measures_of(markdown: str) -> dict[str, str]:
    """Every table row of a report: its first cell -> its second."""
    rows: dict[str, str] = {}
    for line in markdown.splitlines():
        if not line.lstrip().startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2:
            rows.setdefault(cells[0], cells[1])
    return rows


def figure(rows: dict[str, str], measure: str) -> float | None:
    """The first number of the row named `measure` (exactly, else the first row starting
    with it, ignoring case); None when no row has one."""
    wanted = measure.casefold()
    names = [name for name in rows if name.casefold() == wanted] or [
        name for name in rows if name.casefold().startswith(wanted)
    ]
    for name in names:
        found = NUMBER.search(rows[name])
        if found:
            return float(found.group().replace(",", ""))
    return None


def run(side: Side, script: list[str]) -> str:
    print(f"[alternate] {side.label}: {' '.join(script)}", file=sys.stderr, flush=True)
    done = subprocess.run(
        [sys.executable, *script],
        cwd=side.checkout,
        env={**os.environ, "PYTHONPATH": str(side.checkout)},
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        # A script may exit non-zero for a missed target; its figures still count.
        print(f"[alternate] {side.label}: exit {done.returncode}", file=sys.stderr)
    return done.stdout


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], check=True, stdout=subprocess.PIPE, text=True
    ).stdout.strip()


def shown(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=6, help="rounds, each runs both (6)")
    parser.add_argument(
        "--measure", action="append", required=True, help="a row of the report (repeatable)"
    )
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- bench/SCRIPT.py [ARGS]")
    args = parser.parse_args()
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        parser.error("name the benchmark after --, e.g. -- bench/webhook_delay.py")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    changed = " with uncommitted changes" if git("status", "--porcelain") else ""
    here = Side(f"`{git('rev-parse', '--short', 'HEAD')}`{changed}", REPO)
    base_commit = git("rev-parse", "--short", args.base)
    worktree = Path(tempfile.mkdtemp(prefix="promptq-base-"))
    git("worktree", "add", "--detach", str(worktree), base_commit)
    try:
        base = Side(f"`{base_commit}`", worktree)
        figures: dict[str, list[tuple[float | None, float | None]]] = {
            measure: [] for measure in args.measure
        }
        for round_number in range(args.rounds):
            order = [here, base] if round_number % 2 == 0 else [base, here]
            # By side, not by label: a base naming this checkout's own commit has its label.
            reports = {side: measures_of(run(side, script)) for side in order}
            for measure in args.measure:
                figures[measure].append(
                    (figure(reports[here], measure), figure(reports[base], measure))
                )
    finally:
        git("worktree", "remove", "--force", str(worktree))

    header = ["Round"] + [
        f"{measure}, {side}" for measure in args.measure for side in ("here", "base")
    ]
    rows = [
        [str(n + 1)] + [shown(value) for measure in args.measure for value in figures[measure][n]]
        for n in range(args.rounds)
    ]
    medians = ["Median"]
    wins = []
    for measure in args.measure:
        pairs = [(a, b) for a, b in figures[measure] if a is not None and b is not None]
        medians += [
            shown(statistics.median([a for a, _ in pairs])) if pairs else "-",
            shown(statistics.median([b for _, b in pairs])) if pairs else "-",
        ]
        lower = sum(1 for a, b in pairs if a < b)
        wins.append(f"{measure}: lower here in {lower} of {len(pairs)} rounds")
    lines = [
        f"## {' '.join(script)}: {here.label} (here) against {base.label} (base)",
        "",
        f"{args.rounds} rounds in the order ABBA, both sides run with {sys.executable}.",
        "",
        markdown_table(header, [*rows, medians]),
        "",
        *(f"- {line}" for line in wins),
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
