"""A network partition between hosts: two "machines" (network namespaces made here, see
promptq.netns), each running a `promptq api` and a `promptq worker`, with PostgreSQL and
Redis on this machine reachable from both through forwards. While jobs run, host A is cut
from Redis alone, then from PostgreSQL alone, then from both: the packets of those
services are dropped on A's link, so A's open connections hang and its new ones time out,
as on a real network, while host B goes on.

For each cut: no accepted job is lost, the upstream is called again at most for the jobs
claimed and not yet recorded at the cut (those A holds are among them: its calls in flight,
which host A's own simulator counts, and its answers still being recorded), and every job
has finished within 60 s of the link coming back. `bench/partition.py` does the same at scale.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import REPO, wait_for_http
from redis_servers import RedisServer
from sqlalchemy import text as sql
from sqlalchemy.engine import URL, make_url
from stack_parts import new_key, prompts, wait_for_all

from promptq import netns, supervisor
from promptq.db import get_engine
from promptq.simulator import Simulator
from promptq.supervisor import Child

JOBS_PER_CUT = 90
# Submissions run for BEFORE + CUT + AFTER seconds, the cut starting BEFORE seconds in.
BEFORE_SECONDS = 3.0
CUT_SECONDS = 8.0
AFTER_SECONDS = 2.0
# What the issue asks of the 20 s cuts, kept for these shorter ones.
FINISHED_AFTER_HEAL_SECONDS = 60.0
API_PORT = 8000  # each host has its own network namespace: the same port on both


class Machine:
    """One host's promptq: an API and a worker in its namespace, talking to PostgreSQL,
    Redis and its own simulator through its link."""

    def __init__(self, host: netns.Host, env: dict[str, str], logs: Path) -> None:
        self.host = host
        self.env = env
        self.logs = logs
        self.url = f"http://{host.address}:{API_PORT}"
        self.children: list[Child] = []

    def start(self, name: str, args: list[str]) -> Child:
        child = supervisor.start(
            f"{name}@{self.host.namespace}",
            args,
            self.env,
            self.logs / f"{name}.log",
            cwd=REPO,
            prefix=self.host.prefix,
            die_with_parent=True,
        )
        self.children.append(child)
        return child

    def start_api(self) -> None:
        api = self.start("api", ["api", f"--host={self.host.address}", f"--port={API_PORT}"])
        wait_for_http(self.url, api)

    def start_worker(self) -> None:
        worker = self.start("worker", ["worker", "--concurrency=16", "--hostname=w@%h"])
        supervisor.wait_until(lambda: worker.logged(b"ready."), [worker], 60, "the worker")

    def start_beat(self) -> None:
        self.start("beat", ["beat", f"--schedule={self.logs / 'beat-schedule'}"])

    def stop(self) -> None:
        supervisor.stop(self.children, timeout=10)


def _through_forwards(host: netns.Host, database: URL, redis_port: int) -> dict[str, str]:
    """The settings that take a process in `host` to PostgreSQL and Redis through its
    forwards (host.forward)."""
    return {
        "PROMPTQ_DATABASE_URL": database.set(host=host.gateway).render_as_string(
            hide_password=False
        ),
        "PROMPTQ_REDIS_URL": f"redis://{host.gateway}:{redis_port}/0",
    }


@pytest.fixture
def hosts() -> Iterator[list[netns.Host]]:
    try:
        made = netns.hosts(["a", "b"])
    except netns.HostsUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield made
    finally:
        for host in made:
            host.down()


@pytest.mark.timeout(420)
def test_host_a_cut_from_redis_then_postgresql_then_both(
    hosts: list[netns.Host],
    fresh_database_url: str,
    test_env: dict[str, str],
    limits_file: Path,
    tmp_path: Path,
) -> None:
    if not fresh_database_url.startswith("postgresql"):
        pytest.skip("two hosts share a database server: PostgreSQL only")
    database = make_url(fresh_database_url)
    database_port = database.port or 5432
    redis_server = RedisServer(tmp_path, "redis")
    machines: list[Machine] = []
    simulators: list[Simulator] = []
    try:
        for host in hosts:
            host.forward(database_port)
            host.forward(redis_server.port)
            # Each host's own upstream, listening at its end of the link: what it counts
            # in flight is host A's alone.
            simulator = Simulator(host=host.gateway).start()
            simulator.configure(latency=0.8, latency_jitter=0.6)
            simulators.append(simulator)
            env = {
                **test_env,
                **_through_forwards(host, database, redis_server.port),
                "PROMPTQ_UPSTREAM_URL": simulator.url,
                "PROMPTQ_LIMITS_FILE": str(limits_file),
                # Short leases and sweeps, so that recovery takes seconds.
                "PROMPTQ_CLAIM_LEASE_SECONDS": "6",
                "PROMPTQ_SLOT_LEASE_SECONDS": "3",
                "PROMPTQ_SWEEP_INTERVAL_SECONDS": "1",
                "PROMPTQ_REPUBLISH_AFTER_SECONDS": "2",
            }
            logs = tmp_path / host.namespace
            logs.mkdir()
            machines.append(Machine(host, env, logs))
        for machine in machines:
            machine.start_api()
            machine.start_worker()
        machines[1].start_beat()  # the sweeper runs on the host that is never cut
        key = new_key(fresh_database_url, "partition")
        results = [
            _through_a_cut(label, ports, machines, simulators, key, fresh_database_url)
            for label, ports in (
                ("redis", [redis_server.port]),
                ("postgresql", [database_port]),
                ("both", [redis_server.port, database_port]),
            )
        ]
    finally:
        for machine in machines:
            machine.stop()
        for simulator in simulators:
            simulator.stop()
        redis_server.stop()
    print("\npartition figures:", *results, sep="\n")
    for result in results:
        assert result["lost"] == 0, result
        assert result["duplicate_calls"] <= result["claimed_at_cut"], result
        assert result["finished_after_heal_seconds"] <= FINISHED_AFTER_HEAL_SECONDS, result


def _through_a_cut(
    label: str,
    ports: list[int],
    machines: list[Machine],
    simulators: list[Simulator],
    key: str,
    database_url: str,
) -> dict[str, Any]:
    host_a = machines[0].host
    texts = prompts(JOBS_PER_CUT, f"partition {label}")
    accepted: dict[str, str] = {}
    lock = threading.Lock()
    window = BEFORE_SECONDS + CUT_SECONDS + AFTER_SECONDS
    started = time.monotonic()

    def submit(index: int) -> None:
        # Spread over the window; each job first to one host's API and then, after a
        # refusal or a timeout, to the other with the same Idempotency-Key, as a client
        # behind a load balancer would.
        time.sleep(max(0.0, started + window * index / len(texts) - time.monotonic()))
        text = texts[index]
        deadline = time.monotonic() + 120
        attempt = index
        with requests.Session() as http:
            while True:
                url = machines[attempt % 2].url
                attempt += 1
                try:
                    response = http.post(
                        f"{url}/v1/jobs",
                        json={"prompt": text},
                        headers={"x-api-key": key, "Idempotency-Key": f"partition-{text}"},
                        timeout=5,
                    )
                    if response.status_code in (200, 202):
                        with lock:
                            accepted[text] = str(response.json()["id"])
                        return
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    return
                time.sleep(0.2)

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(submit, index) for index in range(len(texts))]
        time.sleep(BEFORE_SECONDS)
        in_flight = int(simulators[0].stats()["in_flight"])
        # The jobs host A may hold at the cut, the bound on calls made twice: claimed and
        # not yet recorded, whether their call is still out or its answer is being
        # recorded (A's calls in flight leave those out), counted on both hosts.
        claimed = _claimed_jobs(database_url)
        host_a.cut(*ports)
        try:
            time.sleep(CUT_SECONDS)
        finally:
            host_a.heal(*ports)
        healed_at = time.time()
        for future in futures:
            future.result()
    reader = requests.Session()

    def read(job_id: str) -> dict[str, Any]:
        # Host B's API: never cut.
        response = reader.get(
            f"{machines[1].url}/v1/jobs/{job_id}", headers={"x-api-key": key}, timeout=10
        )
        return response.json()  # type: ignore[no-any-return]

    jobs = wait_for_all(read, list(accepted.values()), timeout=FINISHED_AFTER_HEAL_SECONDS + 30)
    reader.close()
    calls = {text: 0 for text in texts}
    for simulator in simulators:
        by_prompt = simulator.stats()["calls_by_prompt"]
        for text in texts:
            calls[text] += by_prompt.get(text[:60], 0)
    last_finished = max(datetime.fromisoformat(job["finished_at"]).timestamp() for job in jobs)
    return {
        "cut": label,
        "jobs": len(texts),
        "accepted": len(accepted),
        "lost": len(texts) - sum(job["status"] == "succeeded" for job in jobs),
        "duplicate_calls": sum(n - 1 for n in calls.values() if n > 1),
        "never_called": sum(n == 0 for n in calls.values()),
        "in_flight_on_a_at_cut": in_flight,
        "claimed_at_cut": claimed,
        "finished_after_heal_seconds": round(last_finished - healed_at, 1),
    }


def _claimed_jobs(database_url: str) -> int:
    engine = get_engine(database_url)
    with engine.connect() as connection:
        query = sql("SELECT count(*) FROM jobs WHERE status = 'running'")
        return int(connection.execute(query).scalar_one())


# Run inside host A: a database connection and a broker connection made, then (once the
# test has cut the link, and said so on stdin) a statement, a connect and a publish, each
# timed, printed as "NAME SECONDS OUTCOME".
GIVING_UP = """
import sys, time
from sqlalchemy import text
from promptq.broker.celery_app import create_celery
from promptq.config import get_settings
from promptq.db import get_engine

settings = get_settings()
engine = get_engine(settings)
app = create_celery(settings)
connection = engine.connect()
connection.execute(text("SELECT 1"))
producer = app.producer_pool.acquire(block=True)
producer.publish({"partition": "before"}, routing_key="pq-partition-test", retry=False)
print("ready", flush=True)
sys.stdin.readline()
calls = [
    ("statement", lambda: connection.execute(text("SELECT 1"))),
    ("connect", lambda: engine.connect().close()),
    ("publish", lambda: producer.publish({"cut": 1}, routing_key="pq-partition-test", retry=False)),
]
for name, call in calls:
    started = time.monotonic()
    try:
        call()
        outcome = "answered"
    except Exception as exc:
        outcome = type(exc).__name__
    print(name, round(time.monotonic() - started, 1), outcome, flush=True)
"""
NETWORK_TIMEOUT_SECONDS = 4
# Without the timeouts nothing gives up for minutes; with them, each of the three well
# within this (the statement at TCP's first retransmission past the timeout, the connect
# after min(10, timeout) s, the publish after the broker's 10 s socket timeout).
GIVES_UP_WITHIN_SECONDS = 20.0


def test_a_partitioned_host_gives_up_on_postgresql_and_the_broker_in_seconds(
    hosts: list[netns.Host], fresh_database_url: str, test_env: dict[str, str], tmp_path: Path
) -> None:
    """A statement, a connect and a publish that meet a partition fail within seconds,
    where the kernel's TCP defaults would keep them waiting for minutes, and for up to two
    more minutes after the network came back: the caller's retry then finds a fresh
    connection (promptq.db.network_connect_args, promptq.broker.celery_app)."""
    if not fresh_database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's connection settings")
    host = hosts[0]
    database = make_url(fresh_database_url)
    database_port = database.port or 5432
    redis_server = RedisServer(tmp_path, "redis")
    try:
        host.forward(database_port)
        host.forward(redis_server.port)
        env = {
            **os.environ,
            **test_env,
            **_through_forwards(host, database, redis_server.port),
            "PROMPTQ_DATABASE_NETWORK_TIMEOUT_SECONDS": str(NETWORK_TIMEOUT_SECONDS),
        }
        script = subprocess.Popen(
            [*host.prefix, sys.executable, "-c", GIVING_UP],
            env=env,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert script.stdin is not None and script.stdout is not None
            assert script.stdout.readline().strip() == "ready"
            host.cut(database_port, redis_server.port)
            script.stdin.write("cut\n")
            script.stdin.flush()
            lines: list[str] = []
            reader = threading.Thread(
                target=lambda: lines.extend(script.stdout.readline() for _ in range(3)),  # type: ignore[union-attr]
                daemon=True,
            )
            reader.start()
            reader.join(timeout=3 * GIVES_UP_WITHIN_SECONDS + 10)
        finally:
            host.heal()
            script.kill()
            script.wait()
    finally:
        redis_server.stop()
    print("\ngiving up:", lines)
    outcomes = {
        name: (float(seconds), outcome)
        for name, seconds, outcome in (line.split() for line in lines if line.strip())
    }
    assert set(outcomes) == {"statement", "connect", "publish"}, f"still waiting: {lines}"
    for name, (seconds, outcome) in outcomes.items():
        assert outcome != "answered", name  # the link was cut: nothing can answer
        assert seconds <= GIVES_UP_WITHIN_SECONDS, (name, seconds, outcome)


# redis-py's keepalives (30 s idle, then 3 probes 5 s apart) make the kernel end an idle
# connection with ETIMEDOUT 45 s after its last packet when nothing answers. Cut for 60 s:
# with 50, a CI run on a loaded machine healed the link before the connection had ended,
# so the subscription lived on and the path under test was never taken.
KEEPALIVES_END_IT_SECONDS = 60.0


def test_an_api_whose_redis_connection_died_of_a_partition_answers_after_the_heal(
    hosts: list[netns.Host],
    fresh_database_url: str,
    test_env: dict[str, str],
    limits_file: Path,
    tmp_path: Path,
) -> None:
    """A quiet API process cut from Redis long enough for the kernel to end its events
    subscription (ETIMEDOUT): once the link is back it answers again, and hears again.
    redis-py's listen() took that error for a timeout of its own and spun forever without
    yielding: the API's event loop at full CPU, no request ever answered (api.listener)."""
    if not fresh_database_url.startswith("postgresql"):
        pytest.skip("the host reaches the database over its link: PostgreSQL only")
    host = hosts[0]
    database = make_url(fresh_database_url)
    redis_server = RedisServer(tmp_path, "redis")
    machine: Machine | None = None
    try:
        host.forward(database.port or 5432)
        host.forward(redis_server.port)
        env = {
            **test_env,
            **_through_forwards(host, database, redis_server.port),
            "PROMPTQ_LIMITS_FILE": str(limits_file),
        }
        logs = tmp_path / "logs"
        logs.mkdir()
        machine = Machine(host, env, logs)
        machine.start_api()
        host.cut(redis_server.port)
        try:
            time.sleep(KEEPALIVES_END_IT_SECONDS)
        finally:
            host.heal(redis_server.port)
        healed = time.monotonic()
        answered = None
        while answered is None and time.monotonic() < healed + 20:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{machine.url}/readyz", timeout=2).status_code == 200:
                    answered = time.monotonic() - healed
            time.sleep(0.5)
        api_log = (logs / "api.log").read_text(errors="replace")
    finally:
        if machine is not None:
            machine.stop()
        redis_server.stop()
    assert answered is not None, "the API did not answer within 20 s of the heal"
    # It noticed the dead subscription and made another (readyz asks Redis itself).
    assert "lost the Redis subscription" in api_log
