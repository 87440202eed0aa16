"""The `promptq` command line, run as a real process, as a user runs it."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
import requests
from helpers import clean_env, default_sigint, run_promptq, wait_for_http
from sqlalchemy import create_engine, inspect

from promptq.supervisor import free_port


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    result = run_promptq("db", "upgrade", env=clean_env(PROMPTQ_DATABASE_URL=url))
    assert "head" in result.stdout
    tables = set(inspect(create_engine(url)).get_table_names())
    assert {"api_keys", "jobs", "attempts", "alembic_version"} <= tables


def test_db_check_says_whether_the_schema_is_this_releases(tmp_path: Path) -> None:
    env = clean_env(PROMPTQ_DATABASE_URL=f"sqlite:///{tmp_path / 'fresh.db'}")
    before = run_promptq("db", "check", env=env, check=False)
    assert before.returncode == 1
    assert "no revision" in before.stderr and "promptq db upgrade" in before.stderr
    run_promptq("db", "upgrade", env=env)
    after = run_promptq("db", "check", env=env)
    assert after.stdout.startswith("database at ")

    away = clean_env(PROMPTQ_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:1/none")
    unreachable = run_promptq("db", "check", "--wait", "1", env=away, check=False)
    assert unreachable.returncode == 1 and "does not answer" in unreachable.stderr


def test_keys_create_list_revoke(database_url: str, test_env: dict[str, str]) -> None:
    env = clean_env(PROMPTQ_DATABASE_URL=database_url)
    created = json.loads(
        run_promptq(
            "keys",
            "create",
            "zapier",
            "--rpm",
            "30",
            "--monthly-budget",
            "12.50",
            "--json",
            env=env,
        ).stdout
    )
    assert set(created) == {"id", "name", "key", "webhook_secret"}
    assert created["key"].startswith("pq_") and created["webhook_secret"].startswith("whsec_")

    plain = run_promptq("keys", "create", "n8n", env=env).stdout.splitlines()
    assert plain[1].startswith("pq_") and plain[2].startswith("whsec_")

    listed = run_promptq("keys", "list", "--json", env=env).stdout
    assert created["key"] not in listed and created["webhook_secret"] not in listed
    row = next(r for r in json.loads(listed) if r["id"] == created["id"])
    assert row["rpm"] == 30 and row["monthly_budget_usd"] == "12.5"
    assert row["revoked_at"] is None
    assert "zapier" in run_promptq("keys", "list", env=env).stdout

    assert "revoked" in run_promptq("keys", "revoke", created["id"], env=env).stdout
    row = next(
        r
        for r in json.loads(run_promptq("keys", "list", "--json", env=env).stdout)
        if r["id"] == created["id"]
    )
    assert row["revoked_at"] is not None

    missing = run_promptq("keys", "revoke", "nobody", env=env, check=False)
    assert missing.returncode != 0 and "no key" in missing.stderr
    bad = run_promptq("keys", "create", "x", "--monthly-budget", "lots", env=env, check=False)
    assert bad.returncode != 0 and "US dollars" in bad.stderr


def test_submit_wait_and_jobs_ls(api_server: str, api_key: str) -> None:
    env = clean_env(PROMPTQ_API_URL=api_server, PROMPTQ_API_KEY=api_key)
    result = run_promptq("submit", "Say hello to the CLI", "--wait", env=env)
    assert "Say hello to the CLI" in result.stdout  # the simulator echoes the prompt
    assert "$" in result.stderr  # the cost line
    job_id = run_promptq("submit", "no wait", env=env).stdout.strip()
    assert job_id.startswith("job_")
    listing = run_promptq("jobs", "ls", "--json", env=env).stdout
    assert job_id in {job["id"] for job in json.loads(listing)}

    failed = run_promptq("submit", "x [[sim:400]]", "--wait", env=env, check=False)
    assert failed.returncode != 0 and "failed" in failed.stderr
    no_key = run_promptq("submit", "x", env=clean_env(PROMPTQ_API_URL=api_server), check=False)
    assert no_key.returncode != 0 and "PROMPTQ_API_KEY" in no_key.stderr


def start_up(directory: Path, *options: str) -> subprocess.Popen[str]:
    """`promptq up OPTIONS` in `directory`, as a person starts it in a terminal (a session
    of its own, Ctrl-C's default handler), its output read line by line."""
    return subprocess.Popen(
        [sys.executable, "-m", "promptq", "up", *options],
        env=clean_env(),
        cwd=directory,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,
    )


def test_up_runs_the_whole_stack_calmly_and_stops_cleanly(tmp_path: Path) -> None:
    port, flower_port = free_port(), free_port()
    process = start_up(
        tmp_path, f"--port={port}", f"--flower-port={flower_port}", "--concurrency=4"
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put("")  # the end

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []

    def read_until(text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in seen):
            assert time.monotonic() < deadline, f"no {text!r} in:\n{''.join(seen)}"
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert process.poll() is None, "".join(seen)
        return "".join(seen)

    url = f"http://127.0.0.1:{port}"
    try:
        output = read_until("PROMPTQ_WEBHOOK_SECRET=")
        assert "simulator" in seen[0]
        # The banner comes once the API is ready: its addresses work as soon as they show.
        assert requests.get(f"{url}/readyz", timeout=5).status_code == 200
        key = output.split("PROMPTQ_API_KEY=")[1].split()[0]
        assert output.split("PROMPTQ_WEBHOOK_SECRET=")[1].startswith("whsec_")
        flower_login = output.split("(login ")[1].split(")")[0]
        assert ".promptq/logs/" in output

        job = requests.post(
            f"{url}/v1/jobs?wait=30",
            json={"prompt": "up and running"},
            headers={"x-api-key": key},
            timeout=40,
        ).json()
        assert job["status"] == "succeeded", job
        assert Decimal(job["cost"]["total"]) > 0
        failing = requests.post(
            f"{url}/v1/jobs?wait=30",
            json={"prompt": "refused [[sim:400]]"},
            headers={"x-api-key": key},
            timeout=40,
        ).json()
        # promptq's own short lines: each finished job, with its cost or its error.
        output = read_until(failing["id"])
        [done] = [line for line in seen if job["id"] in line]
        assert "succeeded" in done and f"${job['cost']['total']}" in done
        [refused] = [line for line in seen if failing["id"] in line]
        assert "failed" in refused and "upstream 400" in refused

        flower = f"http://127.0.0.1:{flower_port}"
        assert requests.get(f"{flower}/api/tasks", timeout=5).status_code == 401
        # Flower learns of tasks from the worker's events, which may trail the job a little,
        # and knows only the tasks run since it turned those events on: on a slow machine
        # that may come after the jobs above, so another job goes now and then until Flower
        # shows one.
        job_ids = [job["id"], failing["id"]]
        deadline = time.monotonic() + 60
        next_job = time.monotonic() + 5
        while True:
            tasks = requests.get(
                f"{flower}/api/tasks", auth=tuple(flower_login.split(":", 1)), timeout=5
            ).json()
            shown = json.dumps(list(tasks.values()))
            if any(job_id in shown for job_id in job_ids) or time.monotonic() > deadline:
                break
            if time.monotonic() > next_job:
                another = requests.post(
                    f"{url}/v1/jobs",
                    json={"prompt": "up and running"},
                    headers={"x-api-key": key},
                    timeout=40,
                )
                assert another.status_code == 202, another.text
                job_ids.append(another.json()["id"])
                next_job = time.monotonic() + 5
            time.sleep(0.2)
        assert "promptq.run_job" in {task["name"] for task in tasks.values()}
        # Flower shows a task's arguments: job ids, never the prompt or a secret.
        assert any(job_id in shown for job_id in job_ids), (job_ids, shown)
        assert "up and running" not in shown and key not in shown
    finally:
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        # Everything stops within 10 s (what still runs after 8 s is killed).
        code = process.wait(timeout=15)
    assert code == 0
    leftover = subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True)
    assert leftover.stdout == b""
    # The parts' whole logs are in their files, not in the terminal.
    logs = tmp_path / ".promptq" / "logs"
    assert "Uvicorn running" in (logs / "api.log").read_text()
    assert "promptq.run_job" in (logs / "worker.log").read_text()
    assert (logs / "beat.log").stat().st_size and (logs / "flower.log").stat().st_size
    terminal = "".join(seen) + "".join(iter(lambda: lines.get(timeout=5), ""))
    assert "Uvicorn running" not in terminal and "celery" not in terminal.lower()


def test_up_verbose_shows_every_parts_log(tmp_path: Path) -> None:
    process = start_up(
        tmp_path, f"--port={free_port()}", f"--flower-port={free_port()}", "--verbose"
    )
    lines = []
    try:
        for line in process.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "PROMPTQ_WEBHOOK_SECRET=" in line:
                break
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=15)
    output = "".join(lines)
    assert "Uvicorn running" in output  # the API's own log, before the banner
    assert not (tmp_path / ".promptq" / "logs").exists()


@pytest.mark.parametrize("command", [["worker"], ["api"], ["up"]])
def test_a_broken_limits_file_stops_start_up_with_its_reason(
    tmp_path: Path, command: list[str]
) -> None:
    limits = tmp_path / "limits.toml"
    limits.write_text('[models."claude-*"]\nrpm = "fast"\n')
    env = clean_env(
        PROMPTQ_LIMITS_FILE=str(limits),
        PROMPTQ_REDIS_URL="redis://127.0.0.1:1/0",
        PROMPTQ_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}",
    )
    result = run_promptq(*command, env=env, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "limits.toml" in result.stderr and "rpm" in result.stderr


@pytest.mark.parametrize("credentials", [None, "", "admin", "admin:"])
def test_flower_refuses_to_start_without_basic_auth(
    tmp_path: Path, credentials: str | None
) -> None:
    extra = {"PROMPTQ_REDIS_URL": "redis://127.0.0.1:1/0"}
    if credentials is not None:
        extra["PROMPTQ_FLOWER_BASIC_AUTH"] = credentials
    result = run_promptq("flower", env=clean_env(**extra), cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "PROMPTQ_FLOWER_BASIC_AUTH" in result.stderr


def test_api_says_which_limits_are_in_force_when_no_file_gives_them(tmp_path: Path) -> None:
    import socket

    # A port already taken: the API stops right after its start-up checks.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(
            PROMPTQ_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}",
            PROMPTQ_UPSTREAM_API_KEY="sk-x",
        )
        result = run_promptq("api", f"--port={port}", env=env, cwd=tmp_path, check=False)
    [line] = [line for line in result.stderr.splitlines() if "built-in limits" in line]
    assert "Anthropic's first usage tier" in line and "50 requests" in line
    assert "PROMPTQ_LIMITS_FILE" in line and "promptq limits --from-upstream" in line


def test_limits_names_the_builtins_and_how_to_give_the_accounts_own(tmp_path: Path) -> None:
    result = run_promptq("limits", env=clean_env(), cwd=tmp_path)
    assert "Anthropic's first usage tier" in result.stdout
    assert "PROMPTQ_LIMITS_FILE" in result.stdout and "--from-upstream" in result.stdout
    limits = tmp_path / "limits.toml"
    limits.write_text('[models."claude-*"]\nrpm = 4000\n')
    configured = run_promptq("limits", env=clean_env(PROMPTQ_LIMITS_FILE=str(limits)), cwd=tmp_path)
    assert str(limits) in configured.stdout and "first usage tier" not in configured.stdout


def test_limits_from_upstream_prints_the_limits_it_reports(tmp_path: Path) -> None:
    from promptq.ratelimit.table import LimitTable
    from promptq.simulator import Simulator, SimulatorConfig

    config = SimulatorConfig(rpm=4000, input_tpm=2_000_000, output_tpm=400_000, api_key="sk-x")
    with Simulator(config) as sim:
        env = clean_env(PROMPTQ_UPSTREAM_URL=sim.url, PROMPTQ_UPSTREAM_API_KEY="sk-x")
        result = run_promptq(
            "limits", "--from-upstream", "--model", "claude-opus-4-7", env=env, cwd=tmp_path
        )
        assert sim.stats()["calls"] == 1  # one minimal call
    limits = tmp_path / "limits.toml"
    limits.write_text(result.stdout)
    reported = LimitTable.load(limits).limits_for("claude-opus-4-7")
    assert (reported.rpm, reported.input_tpm, reported.output_tpm) == (4000, 2_000_000, 400_000)
    # What the upstream does not report is inherited, as for any file.
    assert reported.max_concurrency == LimitTable.load(None).limits_for("x").max_concurrency


def test_limits_from_upstream_says_when_the_upstream_reports_none(tmp_path: Path) -> None:
    from promptq.simulator import Simulator

    with Simulator() as sim:  # no limits: no anthropic-ratelimit-* headers, like CometAPI
        env = clean_env(PROMPTQ_UPSTREAM_URL=sim.url, PROMPTQ_UPSTREAM_API_KEY="sk-x")
        result = run_promptq("limits", "--from-upstream", env=env, cwd=tmp_path, check=False)
        refused = run_promptq(
            "limits",
            "--from-upstream",
            env={**env, "PROMPTQ_UPSTREAM_URL": "http://127.0.0.1:1"},
            cwd=tmp_path,
            check=False,
        )
    assert result.returncode == 1 and result.stdout == ""
    assert "reports no limits" in result.stderr and "PROMPTQ_LIMITS_FILE" in result.stderr
    assert refused.returncode == 1 and "PROMPTQ_UPSTREAM_URL" in refused.stderr


@pytest.mark.parametrize("command", [["worker"], ["api"]])
@pytest.mark.parametrize("url", [None, "https://api.cometapi.com", "http://10.0.0.5:8100"])
def test_worker_and_api_refuse_to_start_without_an_upstream_key(
    tmp_path: Path, command: list[str], url: str | None
) -> None:
    extra = {
        "PROMPTQ_REDIS_URL": "redis://127.0.0.1:1/0",
        "PROMPTQ_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
    }
    if url is not None:
        extra["PROMPTQ_UPSTREAM_URL"] = url
    result = run_promptq(*command, env=clean_env(**extra), cwd=tmp_path, check=False)
    assert result.returncode != 0
    # It names what to set, and the upstream it would have called in vain.
    assert "PROMPTQ_UPSTREAM_API_KEY" in result.stderr and "COMETAPI_KEY" in result.stderr
    assert (url or "https://api.cometapi.com") in result.stderr


def test_the_api_starts_without_a_key_when_the_upstream_is_on_this_machine(
    tmp_path: Path, redis_url: str
) -> None:
    port = free_port()
    env = clean_env(
        PROMPTQ_REDIS_URL=redis_url,
        PROMPTQ_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}",
        PROMPTQ_UPSTREAM_URL="http://127.0.0.1:8100",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "promptq", "api", f"--port={port}"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("http://127.0.0.1:8100", True),
        ("http://127.0.0.2", True),
        ("http://localhost:8100", True),
        ("http://[::1]:8100", True),
        ("https://api.cometapi.com", False),
        ("http://10.0.0.5:8100", False),
        ("http://127.0.0.1.example.com", False),
    ],
)
def test_which_upstreams_need_no_key(url: str, local: bool) -> None:
    from promptq.config import Settings

    # Explicit keys: the session's own test environment sets one.
    without_key = Settings(upstream_url=url, upstream_api_key=None)
    assert (without_key.missing_upstream_key() is None) == local
    with_key = Settings(upstream_url=url, upstream_api_key="sk-x")
    assert with_key.missing_upstream_key() is None
