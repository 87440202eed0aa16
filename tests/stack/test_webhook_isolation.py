"""A key whose webhook receivers never answer holds only its own few delivery threads: other
keys' jobs run and their webhooks arrive as if it were not there.

A real worker process on a Redis database of its own (so no other worker takes these
messages), a receiver that accepts connections and never answers, and a real one.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import Receiver, auth, start_process, start_worker, stop_worker

from promptq.config import Settings


class BlackHole:
    """Accepts every connection, reads what comes, never answers; counts the connections
    open at once."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        self.open = 0
        self.most_open = 0
        self.accepted = 0
        self._lock = threading.Lock()
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._hold, args=(connection,), daemon=True).start()

    def _hold(self, connection: socket.socket) -> None:
        with self._lock:
            self.open += 1
            self.accepted += 1
            self.most_open = max(self.most_open, self.open)
        try:
            while connection.recv(65536):
                pass  # the sender gives up after its timeout and closes
        except OSError:
            pass
        finally:
            connection.close()
            with self._lock:
                self.open -= 1

    def close(self) -> None:
        self._closing = True
        self.listener.close()


@pytest.fixture
def isolated(test_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {
        **test_env,
        "PROMPTQ_REDIS_URL": test_env["PROMPTQ_REDIS_URL"].rsplit("/", 1)[0] + "/6",
        "PROMPTQ_WEBHOOK_CONCURRENCY": "4",
        "PROMPTQ_WEBHOOK_MAX_IN_FLIGHT_PER_KEY": "2",
        "PROMPTQ_SWEEP_INTERVAL_SECONDS": "1",
    }
    redis.Redis.from_url(env["PROMPTQ_REDIS_URL"]).flushdb()
    yield env


def test_a_black_holed_receiver_does_not_hold_up_other_keys(
    isolated: dict[str, str], tmp_path: Path, make_key: Any
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    hole, receiver = BlackHole(), Receiver()
    # Four job threads: without threads of their own, eight hanging deliveries would take
    # every one of them for 15 s.
    worker = start_worker(isolated, tmp_path / "worker.log", concurrency=4)
    # The sweeper publishes again the deliveries that found no room.
    beat = start_process(["beat"], isolated, tmp_path / "beat.log")
    settings = Settings(
        database_url=isolated["PROMPTQ_DATABASE_URL"], redis_url=isolated["PROMPTQ_REDIS_URL"]
    )
    try:
        with TestClient(create_app(settings)) as client:
            hostile, polite = make_key("black-holed"), make_key("polite")
            for i in range(8):
                body = {"prompt": f"into the void {i}", "webhook_url": hole.url}
                assert client.post("/v1/jobs", json=body, headers=auth(hostile)).status_code == 202
            deadline = time.monotonic() + 10
            while hole.accepted < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert hole.accepted >= 2  # its deliveries are now hanging

            started = time.monotonic()
            for i in range(6):
                body = {"prompt": f"business as usual {i}", "webhook_url": receiver.url}
                assert client.post("/v1/jobs", json=body, headers=auth(polite)).status_code == 202
            receiver.wait_for(6, timeout=12)
            waited = time.monotonic() - started
            # One key holds at most its share of the delivery threads.
            assert hole.most_open <= 2
    finally:
        stop_worker(beat)
        stop_worker(worker)
        hole.close()
        receiver.server.shutdown()
    # Everything of the polite key arrived while the hostile key's deliveries hung (each for
    # the sender's 15 s timeout).
    assert waited < 12
