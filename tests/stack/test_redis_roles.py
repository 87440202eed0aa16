"""Redis by role (promptq.redis_roles): with PROMPTQ_BROKER_URL, PROMPTQ_LIMITER_REDIS_URL
and PROMPTQ_EVENTS_REDIS_URL on separate servers started by the test, every process (API,
worker, beat, the CLI) puts each role's keys and messages on that role's server alone, and
jobs run end to end. PROMPTQ_REDIS_URL points at no server at all where every role has its
own, so that anything still reading it fails."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, assert_named_as_redis_py
from redis_servers import RedisServer
from stack_parts import Stack, new_key, own_database, prompts

from promptq.config import Settings
from promptq.redis_keys import JOB_FINISHED_CHANNEL as CHANNEL
from promptq.redis_keys import KEY_CHANGED_CHANNEL
from promptq.redis_roles import (
    SentinelGroup,
    async_redis_client,
    celery_broker,
    check_url,
    mask,
    passwords,
    redis_client,
)
from promptq.simulator import Simulator

NOWHERE = "redis://127.0.0.1:1/0"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RedisServer]]:
    workdir = tmp_path_factory.mktemp("roles")
    started: dict[str, RedisServer] = {}
    try:
        for name in ("a", "b", "c"):
            started[name] = RedisServer(workdir, name)
        yield started
    finally:
        for server in started.values():
            server.stop()


class Listener:
    """Every message published on a server, by channel (Celery's events included)."""

    def __init__(self, server: RedisServer) -> None:
        self.channels: dict[str, list[bytes]] = {}
        self.pubsub = server.client().pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(**{"*": self._heard})
        self._thread = self.pubsub.run_in_thread(sleep_time=0.05, daemon=True)

    def _heard(self, message: dict[str, Any]) -> None:
        self.channels.setdefault(message["channel"].decode(), []).append(message["data"])

    def stop(self) -> None:
        self._thread.stop()  # the thread closes the subscription as it ends
        self._thread.join(timeout=5)


def keys_of(server: RedisServer) -> set[str]:
    return {key.decode() for key in server.client().keys("*")}


def run_jobs(env: dict[str, str], logs: Path, key: str, count: int) -> tuple[Stack, list[str]]:
    with Simulator() as simulator:
        stack = Stack(env, logs, simulator, key)
        try:
            stack.start_api()
            stack.start_worker()
            stack.start_beat()
            texts = prompts(count, "roles")
            # Some held open on their job (?wait): woken by the events' pub/sub.
            ids = [
                stack.submit(text, wait=10 if i % 3 == 0 else None) for i, text in enumerate(texts)
            ]
            jobs = stack.wait_all(ids)
            assert all(job["status"] == "succeeded" for job in jobs), stack.logs_text()
            calls = stack.calls(texts)
            assert all(n == 1 for n in calls.values()), calls
        finally:
            stack.stop()
    assert "Traceback" not in stack.logs_text(), stack.logs_text()
    return stack, ids


def role_env(test_env: dict[str, str], database_url: str, **urls: str) -> dict[str, str]:
    return {
        **own_database(test_env, database_url),
        "PROMPTQ_SWEEP_INTERVAL_SECONDS": "1",
        **{f"PROMPTQ_{name.upper()}": url for name, url in urls.items()},
    }


def flush(*servers: RedisServer) -> None:
    for server in servers:
        server.client().flushall()


def test_three_servers_each_hold_their_role_alone(
    servers: dict[str, RedisServer],
    test_env: dict[str, str],
    tmp_path: Path,
    fresh_database_url: str,
) -> None:
    broker, limiter, events = servers["a"], servers["b"], servers["c"]
    flush(broker, limiter, events)
    env = role_env(
        test_env,
        fresh_database_url,
        redis_url=NOWHERE,
        broker_url=broker.url(),
        limiter_redis_url=limiter.url(),
        events_redis_url=events.url(),
    )
    listeners = {name: Listener(server) for name, server in servers.items()}
    try:
        _, ids = run_jobs(env, tmp_path, new_key(fresh_database_url, "roles"), 30)
        # The CLI announces a changed key on the events' server.
        name = f"revoked-{uuid.uuid4().hex[:8]}"
        new_key(fresh_database_url, name)
        done = subprocess.run(
            [sys.executable, "-m", "promptq", "keys", "revoke", name],
            env={**os.environ, **env},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "could not reach" not in done.stderr
    finally:
        for listener in listeners.values():
            listener.stop()
    heard = {name: listener.channels for name, listener in listeners.items()}

    # Broker: Celery's queues and bindings, the publish markers; Celery's events too.
    broker_keys = keys_of(broker)
    assert any(k.startswith("_kombu.binding.") for k in broker_keys), broker_keys
    assert {f"promptq:published:{job_id}" for job_id in ids} <= broker_keys
    assert not any(k.startswith(("promptq:rl:", "promptq:quota:")) for k in broker_keys)
    assert any("celeryev" in channel for channel in heard["a"]), sorted(heard["a"])
    # Limiter: the rate limiter's buckets and the intake quota, nothing of the broker's.
    limiter_keys = keys_of(limiter)
    assert any(k.startswith("promptq:rl:{") for k in limiter_keys), limiter_keys
    assert any(k.startswith("promptq:quota:") for k in limiter_keys), limiter_keys
    assert not any(k.startswith(("_kombu", "unacked", "promptq:published:")) for k in limiter_keys)
    # Events: word of finished jobs and changed keys, and no key at all.
    assert keys_of(events) == set()
    assert set(ids) <= {data.decode() for data in heard["c"].get(CHANNEL, [])}
    assert len(heard["c"].get(KEY_CHANGED_CHANNEL, [])) == 1
    for name in ("a", "b"):
        assert CHANNEL not in heard[name] and KEY_CHANGED_CHANNEL not in heard[name]
    assert not any("celeryev" in channel for channel in [*heard["b"], *heard["c"]])


def test_two_servers_the_broker_apart(
    servers: dict[str, RedisServer],
    test_env: dict[str, str],
    tmp_path: Path,
    fresh_database_url: str,
) -> None:
    broker, rest = servers["a"], servers["b"]
    flush(broker, rest)
    env = role_env(test_env, fresh_database_url, redis_url=rest.url(3), broker_url=broker.url(2))
    run_jobs(env, tmp_path, new_key(fresh_database_url, "two"), 20)
    broker_keys = {k.decode() for k in broker.client(2).keys("*")}
    rest_keys = {k.decode() for k in rest.client(3).keys("*")}
    assert any(k.startswith("promptq:published:") for k in broker_keys)
    assert not any(k.startswith("promptq:rl:") for k in broker_keys)
    assert any(k.startswith("promptq:rl:") for k in rest_keys)
    assert not any(k.startswith(("_kombu", "promptq:published:")) for k in rest_keys)
    # Nothing anywhere else on either server.
    assert broker.client(0).dbsize() == rest.client(0).dbsize() == 0


# ------------------------------------------------------------------ settings and URLs


def test_each_role_defaults_to_the_redis_url() -> None:
    settings = Settings(redis_url="redis://shared:6379/0", events_redis_url="redis://ev/1")
    assert settings.redis_url_for("broker") == "redis://shared:6379/0"
    assert settings.redis_url_for("limiter") == "redis://shared:6379/0"
    assert settings.redis_url_for("events") == "redis://ev/1"
    moved = settings.model_copy(update={"redis_url": "redis://other/0"})
    assert moved.redis_url_for("broker") == "redis://other/0"
    assert Settings(broker_url="redis://b/0", redis_url=None).redis_url_for("limiter") is None


def test_a_sentinel_url_names_its_sentinels_service_and_database() -> None:
    url = "sentinel://user:pw@10.0.0.1,10.0.0.2:26380,[::1]/mymaster/2?sentinel_password=sp"
    group = SentinelGroup.parse(url)
    assert group.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26379))
    assert (group.service, group.db, group.username, group.password) == (
        "mymaster",
        2,
        "user",
        "pw",
    )
    broker, options = celery_broker(url)
    assert broker == (
        "sentinel://user:pw@10.0.0.1:26379/2;sentinel://user:pw@10.0.0.2:26380/2;"
        "sentinel://user:pw@[::1]:26379/2"
    )
    assert options["master_name"] == "mymaster"
    assert options["sentinel_kwargs"]["password"] == "sp"
    assert sorted(passwords(url)) == ["pw", "sp"]
    assert "pw" not in mask(url) and "sp" not in mask(url)
    assert SentinelGroup.parse("sentinel://h/svc").db == 0


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sentinel://h:26379", "/SERVICE"),
        ("sentinel:///mymaster", "at least one"),
        ("sentinel://h:x/mymaster", "port"),
        ("sentinel://h/mymaster/zero", "number"),
        ("sentinel://h/mymaster?master=x", "unknown"),
        ("http://h:6379/0", "redis://"),
    ],
)
def test_a_broken_redis_url_is_refused_at_start(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        check_url(url)
    with pytest.raises(ValueError, match=says):
        Settings(limiter_redis_url=url)


def test_an_unreachable_role_makes_readyz_say_which(
    servers: dict[str, RedisServer], settings: Settings
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    here = servers["a"].url(4)
    split = settings.model_copy(
        update={"redis_url": here, "broker_url": here, "events_redis_url": NOWHERE}
    )
    with TestClient(create_app(split)) as client:
        answer = client.get("/readyz")
    assert answer.status_code == 503
    assert answer.json()["checks"]["redis"] == "unavailable: ConnectionError (events)"


def test_a_client_names_redis_py_without_reading_its_metadata(
    redis_url: str, version_never_read: None
) -> None:
    # Each opens a connection: one that read the metadata would fail here.
    client = redis_client(redis_url)
    assert client.ping()
    assert_named_as_redis_py(client)

    async def ping() -> Any:
        client = async_redis_client(redis_url)
        try:
            assert_named_as_redis_py(client)
            return await client.ping()
        finally:
            await client.aclose()

    assert asyncio.run(ping())
