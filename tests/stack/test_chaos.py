"""Chaos: workers killed in the middle of upstream calls, the API killed under load, the
broker wiped with jobs queued, a worker restarted while the upstream is slow. Every
accepted job must end `succeeded`, and the upstream may be asked twice only for calls that
were in flight when something was killed.

The pieces are real processes (`promptq api`, `promptq worker`, `promptq beat`) on a Redis
database of their own, against a simulator of their own; leases and sweeps are short so
that recovery takes seconds.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from helpers import start_process, start_worker, stop_worker, wait_for_http
from stack_parts import wait_for_all

from promptq.simulator import Simulator
from promptq.supervisor import free_port


class Stack:
    def __init__(self, env: dict[str, str], logs: Path, simulator: Simulator, key: str) -> None:
        self.env = env
        self.logs = logs
        self.simulator = simulator
        self.key = key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers: list[subprocess.Popen[bytes]] = []
        self.api: subprocess.Popen[bytes] | None = None
        self.beat: subprocess.Popen[bytes] | None = None

    def start_api(self) -> None:
        self.api = start_process(["api", f"--port={self.port}"], self.env, self.logs / "api.log")
        wait_for_http(self.url, self.api)

    def start_beat(self) -> None:
        schedule = self.logs / f"beat-{uuid.uuid4().hex[:6]}"
        self.beat = start_process(
            ["beat", f"--schedule={schedule}"], self.env, self.logs / "beat.log"
        )

    def start_worker(self) -> subprocess.Popen[bytes]:
        worker = start_worker(
            self.env, self.logs / f"worker-{len(self.workers)}.log", concurrency=32
        )
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for process in [*self.workers, self.api, self.beat]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    def submit(self, prompt: str, idempotency_key: str | None = None) -> str:
        headers = {"x-api-key": self.key}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        response = requests.post(
            f"{self.url}/v1/jobs", json={"prompt": prompt}, headers=headers, timeout=10
        )
        # 200 when a retried request finds its job already finished.
        assert response.status_code in (200, 202), response.text
        return str(response.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return requests.get(
            f"{self.url}/v1/jobs/{job_id}", headers={"x-api-key": self.key}, timeout=10
        ).json()  # type: ignore[no-any-return]

    def wait_all(self, job_ids: list[str], timeout: float = 90) -> list[dict[str, Any]]:
        return wait_for_all(self.job, job_ids, timeout)

    def calls(self, prompts: list[str]) -> int:
        by_prompt = self.simulator.stats()["calls_by_prompt"]
        return sum(by_prompt.get(prompt[:60], 0) for prompt in prompts)

    def assert_each_called_once(
        self, prompts: list[str], job_ids: list[str], note: str = ""
    ) -> None:
        """With, on failure, what the workers logged of the jobs not called exactly once:
        the story a rare failure needs, since CI keeps no logs."""
        by_prompt = self.simulator.stats()["calls_by_prompt"]
        again = [
            job
            for text, job in zip(prompts, job_ids, strict=True)
            if by_prompt.get(text[:60], 0) != 1
        ]
        if again:
            lines = [
                f"{log.name}: {line[:300]}"
                for log in sorted(self.logs.glob("worker-*.log"))
                for line in log.read_text(errors="replace").splitlines()
                if any(job in line for job in again) or "shutdown" in line.lower()
            ]
            pytest.fail(
                f"{len(again)} of {len(job_ids)} jobs were not called exactly once "
                f"({self.calls(prompts)} calls{'; ' + note if note else ''}); the workers' "
                "lines about them:\n" + "\n".join(lines[-80:])
            )


@pytest.fixture
def stack(test_env: dict[str, str], tmp_path: Path, make_key: Any) -> Iterator[Stack]:
    redis_url = test_env["PROMPTQ_REDIS_URL"].rsplit("/", 1)[0] + "/5"
    redis.Redis.from_url(redis_url).flushdb()
    with Simulator() as simulator:
        env = {
            **test_env,
            "PROMPTQ_REDIS_URL": redis_url,
            "PROMPTQ_UPSTREAM_URL": simulator.url,
            "PROMPTQ_CLAIM_LEASE_SECONDS": "5",
            "PROMPTQ_SLOT_LEASE_SECONDS": "3",
            "PROMPTQ_SWEEP_INTERVAL_SECONDS": "1",
            "PROMPTQ_REPUBLISH_AFTER_SECONDS": "2",
        }
        chaos = Stack(env, tmp_path, simulator, make_key("chaos"))
        try:
            yield chaos
        finally:
            chaos.stop()


def prompts(n: int, label: str) -> list[str]:
    return [f"{uuid.uuid4().hex[:12]} {label} {i}" for i in range(n)]


def test_workers_killed_in_the_middle_of_calls(stack: Stack) -> None:
    stack.simulator.configure(latency=1.5)
    stack.start_api()
    stack.start_beat()
    victim = stack.start_worker()
    stack.start_worker()
    texts = prompts(60, "kill a worker")
    ids = [stack.submit(text) for text in texts]
    time.sleep(1.0)
    in_flight = stack.simulator.stats()["in_flight"]
    assert in_flight > 0
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    stack.start_worker()
    jobs = stack.wait_all(ids)
    assert all(job["status"] == "succeeded" for job in jobs)
    extra_calls = stack.calls(texts) - len(texts)
    assert 0 <= extra_calls <= in_flight


def test_api_killed_under_load_loses_and_doubles_nothing(stack: Stack) -> None:
    stack.simulator.configure(latency=0.2)
    stack.start_api()
    stack.start_beat()
    stack.start_worker()
    texts = prompts(120, "kill the api")
    accepted: dict[str, str] = {}
    errors: dict[str, str] = {}
    lock = threading.Lock()

    def client(mine: list[str]) -> None:
        # What n8n and Zapier do: resend the same request, with the same key, until a 2xx.
        for text in mine:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    job_id = stack.submit(text, idempotency_key=f"chaos-{text}")
                except (requests.RequestException, AssertionError) as exc:
                    errors[text] = repr(exc)[:300]
                    time.sleep(0.2)
                    continue
                with lock:
                    accepted[text] = job_id
                break

    threads = [threading.Thread(target=client, args=(texts[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    assert stack.api is not None
    stack.api.send_signal(signal.SIGKILL)
    stack.api.wait()
    time.sleep(1.0)
    stack.start_api()
    for thread in threads:
        thread.join(timeout=90)
    assert len(accepted) == len(texts), [errors[t] for t in texts if t not in accepted]
    jobs = stack.wait_all(list(accepted.values()))
    assert all(job["status"] == "succeeded" for job in jobs)
    assert len({job["id"] for job in jobs}) == len(texts)
    stack.assert_each_called_once(list(accepted), list(accepted.values()))  # none ran twice


def test_redis_wiped_with_jobs_queued(stack: Stack) -> None:
    stack.start_api()
    texts = prompts(40, "flushed")
    ids = [stack.submit(text) for text in texts]
    redis.Redis.from_url(stack.env["PROMPTQ_REDIS_URL"]).flushdb()  # every message gone
    stack.start_beat()
    stack.start_worker()
    jobs = stack.wait_all(ids, timeout=60)
    assert all(job["status"] == "succeeded" for job in jobs)
    stack.assert_each_called_once(texts, ids)


def test_worker_restarted_while_the_upstream_is_slow(stack: Stack) -> None:
    stack.simulator.configure(latency=3.0)
    stack.start_api()
    stack.start_beat()
    worker = stack.start_worker()
    texts = prompts(20, "slow restart")
    ids = [stack.submit(text) for text in texts]
    deadline = time.monotonic() + 10  # the calls take 3 s: stop the worker while they run
    while stack.simulator.stats()["in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.simulator.stats()["in_flight"] > 0
    signalled = time.monotonic()
    stop_worker(worker)  # SIGTERM: a warm shutdown finishes the calls in flight
    stopped = f"the first worker exited {worker.returncode} {time.monotonic() - signalled:.1f} s"
    stack.start_worker()
    jobs = stack.wait_all(ids)
    assert all(job["status"] == "succeeded" for job in jobs)
    stack.assert_each_called_once(texts, ids, note=f"{stopped} after its SIGTERM")
