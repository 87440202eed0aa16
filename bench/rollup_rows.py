"""How many recordings a second one key and model's hourly rollup rows take, spread over
promptq.rollups.ROLLUP_SHARDS rows an hour (the shards tables), against one row an hour (the
rollups' tables, as recorded before the shards: the baseline, measured in the same run), as
PostgreSQL sees them: each recording's two upserts (usage, then attempts) in one
transaction, as `pgbench` clients run them, at several client counts.

This is the database's side of the ceiling, without promptq's Python around it: many
workers recording one key's jobs wait on these rows' locks, held from the upsert to the
commit's flush. Needs `pgbench` (PostgreSQL's client tools) on the PATH.

    .venv/bin/python bench/rollup_rows.py [--clients 4 16 64] [--seconds 8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from _report import cpu_model, markdown_table, print_markdown
from _stack import (
    DEFAULT_POSTGRES_SERVER,
    create_api_key,
    database_version,
    log,
    provision_database,
)
from sqlalchemy.engine import make_url

from promptq.rollups import (
    ATTEMPT_COUNTS,
    ATTEMPT_KEYS,
    ATTEMPT_SHARD_KEYS,
    ROLLUP_SHARDS,
    USAGE_COUNTS,
    USAGE_KEYS,
    USAGE_SHARD_KEYS,
)

HOUR = "2026-12-01 10:00:00+00"


def _upsert(
    table: str, keys: tuple[str, ...], counts: tuple[str, ...], values: dict[str, str]
) -> str:
    """One recording's upsert of `table`: `values` for the keys, 1 for every figure, and
    pgbench's variable for a shard."""
    names = [*keys, *counts]
    given = [values.get(name, ":shard" if name == "shard" else "1") for name in names]
    added = ", ".join(f"{name} = {table}.{name} + excluded.{name}" for name in counts)
    return (
        f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(given)}) "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {added};"
    )


def script(key_id: str, sharded: bool) -> str:
    """A recording as pgbench runs it: into the rollups' tables, one row an hour (as before
    the shards), or into their shards tables, a shard picked at random."""
    common = {"hour": f"'{HOUR}'", "api_key_id": f"'{key_id}'", "model": "'claude-sonnet-4-5'"}
    suffix = "_shards" if sharded else ""
    usage = _upsert(
        f"usage_hourly{suffix}",
        USAGE_SHARD_KEYS if sharded else USAGE_KEYS,
        USAGE_COUNTS,
        {**common, "status": "'succeeded'", "priced": "true"},
    )
    attempt = _upsert(
        f"attempt_hourly{suffix}",
        ATTEMPT_SHARD_KEYS if sharded else ATTEMPT_KEYS,
        ATTEMPT_COUNTS,
        {**common, "outcome": "'succeeded'", "status_code": "'200'"},
    )
    return f"\\set shard random(0, {ROLLUP_SHARDS - 1})\nBEGIN;\n{usage}\n{attempt}\nEND;\n"


def run_pgbench(url: str, script_path: Path, clients: int, seconds: int) -> tuple[float, float]:
    """(recordings per second, mean latency in ms)."""
    parts = make_url(url)
    command = [
        "pgbench",
        "--no-vacuum",
        f"--host={parts.host}",
        f"--port={parts.port or 5432}",
        f"--username={parts.username}",
        f"--client={clients}",
        f"--jobs={min(clients, os.cpu_count() or 1)}",
        f"--time={seconds}",
        f"--file={script_path}",
        str(parts.database),
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    tps = re.search(r"tps = ([\d.]+)", output)
    latency = re.search(r"latency average = ([\d.]+) ms", output)
    assert tps is not None and latency is not None, output
    return float(tps.group(1)), float(latency.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--seconds", type=int, default=8)
    args = parser.parse_args()
    if shutil.which("pgbench") is None:
        raise SystemExit("pgbench not found: install PostgreSQL's client tools")
    load = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        database = provision_database(stack, None, sqlite=False, workdir=workdir)
        key_id, _ = create_api_key(database.url, "rollup-rows")
        rows = []
        for clients in args.clients:
            figures = []
            for sharded in (False, True):
                path = workdir / f"record-{'sharded' if sharded else 'one'}.sql"
                path.write_text(script(key_id, sharded))
                log(f"{clients} clients, {'shards' if sharded else 'one row an hour'}")
                figures.append(run_pgbench(database.url, path, clients, args.seconds))
            (one, one_ms), (spread, spread_ms) = figures
            rows.append(
                [
                    str(clients),
                    f"{one:,.0f}/s, {one_ms:.2f} ms",
                    f"{spread:,.0f}/s, {spread_ms:.2f} ms",
                    f"{spread / one:.2f}x",
                ]
            )
        kind, version = database_version(database.url)
    print_markdown(
        [
            "## Rollup rows: recordings of one key and model a second",
            "",
            markdown_table(
                ["Machine", ""],
                [
                    ["CPU", cpu_model()],
                    ["Cores (logical)", str(os.cpu_count() or "?")],
                    ["OS", f"{platform.system()} {platform.release()}"],
                    ["Load average at start (1 min)", f"{load:.2f}"],
                    ["Database", f"{kind} {version} ({DEFAULT_POSTGRES_SERVER})"],
                ],
            ),
            "",
            markdown_table(
                [
                    "pgbench clients",
                    "1 row an hour (baseline)",
                    f"{ROLLUP_SHARDS} rows an hour",
                    "ratio",
                ],
                rows,
            ),
            "",
            f"Each recording: BEGIN, the usage and attempt upserts, COMMIT; "
            f"{args.seconds} s per cell; rate and mean latency as pgbench reports them.",
        ]
    )


if __name__ == "__main__":
    main()
