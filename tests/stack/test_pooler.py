"""PgBouncer in front of PostgreSQL (transaction pooling, as deploy/ runs it): a real
pgbouncer started by the test with 20 server connections; the migrations, then 2 API
processes and 3 worker processes (each allowed 20 connections of its own, 100 in all) run
jobs end to end through it with PROMPTQ_DATABASE_POOLER=pgbouncer. PostgreSQL never sees
more than the pooler's 20, and psycopg prepares nothing the next server connection would
not know."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import _create_postgres_database
from helpers import REPO
from redis_servers import RedisServer, wait_until
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from stack_parts import Stack, new_key, prompts

from promptq import supervisor
from promptq.db import get_engine
from promptq.simulator import Simulator
from promptq.supervisor import free_port

SERVER_CONNECTIONS = 20
JOBS = 300

PGBOUNCER_INI = """[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
auth_type = trust
auth_file = {dir}/users.txt
admin_users = {user}
stats_users = {user}
pool_mode = transaction
default_pool_size = {pool}
max_db_connections = {pool}
max_client_conn = 1000
server_reset_query =
ignore_startup_parameters = extra_float_digits,options
logfile = {dir}/pgbouncer.log
pidfile = {dir}/pgbouncer.pid
"""


class PgBouncer:
    def __init__(self, workdir: Path, server: URL, pool: int) -> None:
        self.port = free_port()
        self.user = server.username or "postgres"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            # PgBouncer refuses to run as root and drops to `nobody`, who cannot reach
            # pytest's own temporary directories: a directory of its own, removed after.
            workdir = Path(tempfile.mkdtemp(prefix="promptq-pgbouncer-"))
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "users.txt").write_text(f'"{self.user}" ""\n')
        config = workdir / "pgbouncer.ini"
        config.write_text(
            PGBOUNCER_INI.format(
                host=server.host or "127.0.0.1",
                port=server.port or 5432,
                listen_port=self.port,
                dir=workdir,
                user=self.user,
                pool=pool,
            )
        )
        argv = [str(shutil.which("pgbouncer")), str(config)]
        if self.as_root:
            os.chmod(workdir, 0o777)
            for path in workdir.iterdir():
                os.chmod(path, 0o666)
            argv[1:1] = ["-u", "nobody"]
        self.log = workdir / "pgbouncer.log"
        with open(workdir / "stdout.log", "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        wait_until(self._answers, 15, "pgbouncer to listen")

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            said = (self.dir / "stdout.log").read_text(errors="replace")
            raise AssertionError(f"pgbouncer exited: {said}")
        return bool(self.show("VERSION"))

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def show(self, what: str) -> list[dict[str, str]]:
        """The admin console's `SHOW what`, a dict per row (the console speaks only the
        simple query protocol, which psql does)."""
        done = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", "pgbouncer",
             "-A", "-F", "\t", "-P", "footer=off", "-c", f"SHOW {what}"],
            capture_output=True,
            text=True,
            timeout=10,
        )  # fmt: skip
        if done.returncode != 0:
            return []
        header, *rows = done.stdout.splitlines()
        return [dict(zip(header.split("\t"), row.split("\t"), strict=False)) for row in rows]

    def stop(self) -> None:
        supervisor.stop([self.process], timeout=10)
        if self.as_root:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def server_url(database_url: str) -> str:
    if database_url.startswith("sqlite"):
        pytest.skip("PgBouncer fronts PostgreSQL: runs with PROMPTQ_TEST_DATABASE_URL")
    if shutil.which("pgbouncer") is None or shutil.which("psql") is None:
        pytest.skip(
            "pgbouncer or psql is not installed (Debian packages pgbouncer and "
            "postgresql-client; .ci/run installs pgbouncer where apt-get can)"
        )
    return os.environ["PROMPTQ_TEST_DATABASE_URL"]


@pytest.fixture
def empty_database(server_url: str) -> Iterator[tuple[str, str]]:
    """(name, direct URL) of a new, empty database (the migrations run through the pooler)."""
    direct, drop = _create_postgres_database(server_url)
    yield str(make_url(direct).database), direct
    drop()


def test_the_stack_runs_through_pgbouncer_on_20_server_connections(
    server_url: str,
    empty_database: tuple[str, str],
    test_env: dict[str, str],
    tmp_path: Path,
) -> None:
    name, direct = empty_database
    pooler = PgBouncer(tmp_path / "pgbouncer", make_url(server_url), SERVER_CONNECTIONS)
    redis_server = RedisServer(tmp_path, "redis")
    try:
        env = {
            **test_env,
            "PROMPTQ_DATABASE_URL": pooler.url(name),
            "PROMPTQ_DATABASE_POOLER": "pgbouncer",
            "PROMPTQ_REDIS_URL": redis_server.url(),
            "PROMPTQ_SWEEP_INTERVAL_SECONDS": "1",
        }
        # The migrations through the pooler too (deploy/'s migrate job goes through it).
        migrated = subprocess.run(
            [sys.executable, "-m", "promptq", "db", "upgrade"],
            env={**os.environ, **env},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert migrated.returncode == 0, migrated.stderr
        key = new_key(direct, "pooled")
        get_engine(direct).dispose()  # PostgreSQL then sees PgBouncer's connections only
        figures = _run(env, tmp_path / "logs", key, pooler, server_url, name)
    finally:
        pooler.stop()
        redis_server.stop()
    logs = figures.pop("logs")
    print(f"\npooler figures: {figures}")
    assert figures["lost"] == 0 and figures["called_twice"] == 0
    assert figures["max_server_connections"] <= SERVER_CONNECTIONS
    # More clients than servers: the pooler really shared its 20 among the 5 processes.
    assert figures["max_client_connections"] > SERVER_CONNECTIONS
    assert "prepared statement" not in logs


def _run(
    env: dict[str, str], logs: Path, key: str, pooler: PgBouncer, server_url: str, name: str
) -> dict[str, Any]:
    logs.mkdir()
    watcher = create_engine(make_url(server_url).set(database="postgres"))
    peaks = {"server": 0, "client": 0, "waiting": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with watcher.connect() as connection:
                count = connection.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE datname = :name"),
                    {"name": name},
                ).scalar_one()
            clients = [row for row in pooler.show("CLIENTS") if row.get("database") == name]
            pools = [row for row in pooler.show("POOLS") if row.get("database") == name]
            peaks["server"] = max(peaks["server"], int(count))
            peaks["client"] = max(peaks["client"], len(clients))
            for pool in pools:
                peaks["waiting"] = max(peaks["waiting"], int(pool["cl_waiting"]))
            stop.wait(0.25)

    with Simulator() as simulator:
        simulator.configure(latency=0.5, latency_jitter=0.5)
        stack = Stack(env, logs, simulator, key)
        thread = threading.Thread(target=watch, daemon=True)
        try:
            stack.start_api()
            stack.start_api()
            for _ in range(3):
                stack.start_worker(concurrency=24)
            stack.start_beat()
            thread.start()
            texts = prompts(JOBS, "pooled")
            before = _stats(pooler, name)
            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                # A quarter held open on their job (?wait), as n8n's calls are.
                waits = [5 if i % 4 == 0 else None for i in range(JOBS)]
                ids = list(pool.map(stack.submit, texts, [None] * JOBS, waits))
            jobs = stack.wait_all(ids, timeout=90)
            seconds = time.monotonic() - started
            calls = stack.calls(texts)
            after = _stats(pooler, name)
        finally:
            stop.set()
            stack.stop()
            thread.join(timeout=5)
            watcher.dispose()
    return {
        "jobs": JOBS,
        "lost": sum(job["status"] != "succeeded" for job in jobs),
        "called_twice": sum(n - 1 for n in calls.values() if n > 1),
        "seconds": round(seconds, 1),
        "jobs_per_second": round(JOBS / seconds, 1),
        "max_server_connections": peaks["server"],
        "max_client_connections": peaks["client"],
        # Clients queued for a server connection at once (sampled), and the mean wait of a
        # transaction for one; what the run cost PostgreSQL, per job (the API's reads and
        # the processes' own polling included).
        "max_clients_waiting": peaks["waiting"],
        "mean_wait_ms_per_transaction": round(
            (after["wait_us"] - before["wait_us"]) / 1000 / (after["xacts"] - before["xacts"]), 3
        ),
        "transactions_per_job": round((after["xacts"] - before["xacts"]) / JOBS, 1),
        "statements_per_job": round((after["queries"] - before["queries"]) / JOBS, 1),
        "logs": stack.logs_text(),
    }


def _stats(pooler: PgBouncer, name: str) -> dict[str, int]:
    (row,) = [row for row in pooler.show("STATS") if row.get("database") == name]
    return {
        "xacts": int(row["total_xact_count"]),
        "queries": int(row["total_query_count"]),
        "wait_us": int(row["total_wait_time"]),
    }
