"""`promptq run FILE`: a file of prompts as jobs, run as a user runs it (a real process
against a real API, worker and the simulator), written back in the input's order."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import auth, clean_env, default_sigint, run_promptq

from promptq.runs import RunFileError, RunSpec, read_rows

# ---------------------------------------------------------------------------------------
# Rows and templates (no processes)


def rows_of(tmp_path: Path, name: str, text: str, prompt: str) -> Any:
    path = tmp_path / name
    path.write_text(text)
    return read_rows(path, path.read_bytes(), RunSpec.inline(prompt, None, None))


def test_bad_rows_are_named_by_their_line_and_do_not_stop_the_others(tmp_path: Path) -> None:
    columns, rows = rows_of(
        tmp_path,
        "in.csv",
        'name,city\nAda,London\n"Grace\nHopper",Arlington\n\nAlan\nLinus,Helsinki,x\n',
        "Greet {{ name }} of {{ city }}",
    )
    assert columns == ["name", "city"]
    assert [row.line for row in rows] == [2, 3, 6, 7]
    assert rows[0].job.prompt == "Greet Ada of London" and rows[0].error is None
    assert rows[1].job.prompt == "Greet Grace\nHopper of Arlington"  # a quoted line break
    assert rows[2].error.startswith("line 6: 1 fields where the header names 2")
    assert rows[3].error.startswith("line 7: 3 fields")
    assert rows[2].result["status"] == "failed" and rows[2].result["job_id"] is None


def test_a_missing_column_and_a_template_error_fail_their_row_only(tmp_path: Path) -> None:
    _, rows = rows_of(
        tmp_path,
        "in.jsonl",
        '{"n": 1, "word": "a"}\n{"n": 2}\nnot json\n{"n": "x", "word": "b"}\n[1]\n',
        "{{ word }} {{ n + 1 }}",
    )
    assert rows[0].job.prompt == "a 2"
    assert "line 2:" in rows[1].error and "'word' is undefined" in rows[1].error
    assert "add that column" in rows[1].error
    assert rows[2].error.startswith("line 3: not JSON")
    assert rows[3].error.startswith("line 4: template") and "TypeError" in rows[3].error
    assert rows[4].error == "line 5: a JSON object per line, please"


def test_the_sandbox_is_the_templates_sandbox(tmp_path: Path) -> None:
    _, [row] = rows_of(
        tmp_path, "in.csv", "x\n1\n", "{{ x.__class__.__mro__[1].__subclasses__() }}"
    )
    assert "refused" in row.error or "unsafe" in row.error
    with pytest.raises(RunFileError, match="line 1"):
        RunSpec.inline("{{ unclosed", None, None)


# ---------------------------------------------------------------------------------------
# The command, against the stack


def run_env(api_server: str, api_key: str) -> dict[str, str]:
    return clean_env(PROMPTQ_API_URL=api_server, PROMPTQ_API_KEY=api_key)


def test_a_thousand_rows_run_once_and_come_back_in_order(
    api_server: str, api_key: str, tmp_path: Path, simulator: Any
) -> None:
    source = tmp_path / "questions.csv"
    with open(source, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["id", "topic"])
        for n in range(1000):
            writer.writerow([n, f"topic {n}"])
    lines = source.read_text().splitlines()
    lines[500] = "499.5"  # a row missing its topic column (line 501)
    source.write_text("\n".join(lines) + "\n")
    result_path = tmp_path / "answers.csv"
    env = run_env(api_server, api_key)
    calls_before = simulator.stats()["calls"]

    args = ["run", str(source), "--prompt", "Write about {{ topic }} ({{ id }})"]
    first = run_promptq(
        *args,
        "--model",
        "claude-haiku-4-5",
        "--max-tokens",
        "64",
        "--out",
        str(result_path),
        env=env,
        check=False,
        timeout=300,
    )
    assert first.returncode == 1, first.stderr  # one row failed
    assert "line 501: 1 fields where the header names 2" in first.stderr
    # Not a terminal: plain progress lines, the last one with nothing waiting.
    progress = [line for line in first.stderr.splitlines() if line.startswith("run_")]
    assert progress and "0 waiting" in progress[-1]
    run = first.stdout.split(":")[0]
    assert first.stdout.startswith(f"{run}: 1000 rows, 999 succeeded, 1 failed, $")

    with open(result_path, newline="") as answers:
        table = list(csv.DictReader(answers))
    assert list(table[0]) == ["id", "topic", "output_text", "status", "error", "cost_usd", "job_id"]
    assert len(table) == 1000
    assert [row["id"] for row in table[:3]] == ["0", "1", "2"]
    assert table[499]["status"] == "failed" and table[499]["job_id"] == ""
    assert "line 501" in table[499]["error"]
    good = [row for row in table if row["status"] == "succeeded"]
    assert len(good) == 999
    for row in good:
        assert f"Write about {row['topic']} ({row['id']})" in row["output_text"]
        assert Decimal(row["cost_usd"]) > 0 and row["job_id"].startswith("job_")
    assert len({row["job_id"] for row in good}) == 999
    assert simulator.stats()["calls"] - calls_before == 999

    # The same command again is the same run: nothing is sent twice.
    again = run_promptq(
        *args,
        "--model",
        "claude-haiku-4-5",
        "--max-tokens",
        "64",
        "--out",
        str(tmp_path / "again.jsonl"),
        env=env,
        check=False,
        timeout=300,
    )
    assert again.stdout.startswith(f"{run}: 1000 rows, 999 succeeded")
    assert simulator.stats()["calls"] - calls_before == 999
    records = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [r["job_id"] for r in records] == [row["job_id"] or None for row in table]
    assert records[0]["id"] == "0" and records[0]["status"] == "succeeded"


def test_a_stored_template_and_ctrl_c_leave_the_run_going(
    api_server: str, api_key: str, tmp_path: Path
) -> None:
    created = requests.post(
        f"{api_server}/v1/templates",
        json={
            "name": "slow-greeting",
            "prompt": "Hello {{ name }} [[sim:latency=3]]",
            "max_tokens": 32,
        },
        headers=auth(api_key),
        timeout=10,
    )
    assert created.status_code == 201, created.text
    source = tmp_path / "names.jsonl"
    source.write_text("".join(json.dumps({"name": f"n{n}"}) + "\n" for n in range(5)))
    out = tmp_path / "greetings.jsonl"
    args = [
        sys.executable,
        "-m",
        "promptq",
        "run",
        str(source),
        "--template",
        "slow-greeting",
        "--out",
        str(out),
    ]
    process = subprocess.Popen(
        args,
        env=run_env(api_server, api_key),
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    first = process.stderr.readline()  # type: ignore[union-attr]
    assert first.startswith("run_"), first  # the rows are sent; now it watches
    os.killpg(process.pid, signal.SIGINT)
    rest = process.stderr.read()  # type: ignore[union-attr]
    assert process.wait(timeout=20) == 130
    assert "goes on on the server" in rest and "--resume run_" in rest
    command = rest.split("reattach with:")[1].strip()
    assert not out.exists()

    # The jobs went on without it; reattaching finds them finished or nearly so.
    time.sleep(3)
    reattached = subprocess.run(
        [sys.executable, "-m", "promptq", *command.split()[1:]],
        env=run_env(api_server, api_key),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert reattached.returncode == 0, reattached.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["name"] for r in records] == [f"n{n}" for n in range(5)]
    assert all(r["status"] == "succeeded" and "Hello n" in r["output_text"] for r in records)


def test_usage_errors_say_what_to_give(api_server: str, api_key: str, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("a\n1\n")
    env = run_env(api_server, api_key)
    neither = run_promptq("run", str(source), env=env, check=False)
    assert neither.returncode == 2 and "--prompt TEMPLATE or --template NAME" in neither.stderr
    bad_out = run_promptq(
        "run", str(source), "--prompt", "x", "--out", "r.txt", env=env, check=False
    )
    assert bad_out.returncode == 1 and ".csv or .jsonl" in bad_out.stderr
    missing = run_promptq("run", str(source), "--template", "nope", env=env, check=False)
    assert missing.returncode == 1 and "404" in missing.stderr and "nope" in missing.stderr
