"""A whole promptq deployment of real processes for one test: API processes, workers and
beat with one environment, against a simulator of the test's own."""

from __future__ import annotations

import itertools
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from helpers import start_process, start_worker, stop_worker, wait_for_http

from promptq.simulator import Simulator
from promptq.supervisor import free_port
from promptq.testing import FINAL


def prompts(n: int, label: str) -> list[str]:
    return [f"{uuid.uuid4().hex[:12]} {label} {i}" for i in range(n)]


def own_database(env: dict[str, str], database_url: str) -> dict[str, str]:
    """`env` on a database of the test's own (`fresh_database_url`): the session's holds
    other tests' unfinished jobs, which this stack's sweeper would publish again and its
    workers run against its simulator, blurring what the test measures."""
    return {**env, "PROMPTQ_DATABASE_URL": database_url}


def new_key(database_url: str, name: str) -> str:
    from promptq.db import session_scope
    from promptq.keys.service import create_key

    with session_scope(database_url) as session:
        return create_key(session, name).key


class Stack:
    def __init__(self, env: dict[str, str], logs: Path, simulator: Simulator, key: str) -> None:
        self.env = {**env, "PROMPTQ_UPSTREAM_URL": simulator.url}
        self.logs = logs
        self.simulator = simulator
        self.key = key
        self.apis: list[tuple[subprocess.Popen[bytes], str]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.others: list[subprocess.Popen[bytes]] = []
        self._next_api = itertools.count()
        self.http = requests.Session()

    def start_api(self) -> str:
        port = free_port()
        process = start_process(
            ["api", f"--port={port}"], self.env, self.logs / f"api-{len(self.apis)}.log"
        )
        url = f"http://127.0.0.1:{port}"
        self.apis.append((process, url))
        wait_for_http(url, process)
        return url

    def start_worker(self, concurrency: int = 16) -> subprocess.Popen[bytes]:
        log = self.logs / f"worker-{len(self.workers)}.log"
        worker = start_worker(self.env, log, concurrency=concurrency)
        self.workers.append(worker)
        return worker

    def start_beat(self) -> None:
        schedule = self.logs / f"beat-{uuid.uuid4().hex[:6]}"
        self.others.append(
            start_process(["beat", f"--schedule={schedule}"], self.env, self.logs / "beat.log")
        )

    @property
    def url(self) -> str:
        """The API processes in turn."""
        return self.apis[next(self._next_api) % len(self.apis)][1]

    def submit(self, prompt: str, model: str | None = None, wait: float | None = None) -> str:
        body: dict[str, Any] = {"prompt": prompt, **({"model": model} if model else {})}
        response = self.http.post(
            f"{self.url}/v1/jobs",
            params={"wait": wait} if wait else None,
            json=body,
            headers={"x-api-key": self.key},
            timeout=30,
        )
        assert response.status_code in (200, 202), response.text
        return str(response.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(
            f"{self.url}/v1/jobs/{job_id}", headers={"x-api-key": self.key}, timeout=10
        )
        return response.json()  # type: ignore[no-any-return]

    def wait_all(self, job_ids: list[str], timeout: float = 60) -> list[dict[str, Any]]:
        return wait_for_all(self.job, job_ids, timeout)

    def calls(self, texts: list[str]) -> dict[str, int]:
        """Upstream calls per prompt."""
        by_prompt = self.simulator.stats()["calls_by_prompt"]
        return {text: by_prompt.get(text[:60], 0) for text in texts}

    def logs_text(self) -> str:
        return "\n".join(
            f"==== {path.name}\n{path.read_text(errors='replace')}"
            for path in sorted(self.logs.glob("*.log"))
        )

    def stop(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                stop_worker(worker)
        for process in [*(p for p, _ in self.apis), *self.others]:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.http.close()


def wait_for_all(
    read_job: Callable[[str], dict[str, Any]], job_ids: list[str], timeout: float
) -> list[dict[str, Any]]:
    """Every job, read through `read_job` until it has finished, in the order given."""
    deadline = time.monotonic() + timeout
    pending = set(job_ids)
    jobs: dict[str, dict[str, Any]] = {}
    while pending and time.monotonic() < deadline:
        for job_id in sorted(pending):
            job = read_job(job_id)
            if job["status"] in FINAL:
                jobs[job_id] = job
                pending.discard(job_id)
        if pending:
            time.sleep(0.3)
    assert not pending, f"{len(pending)} jobs never finished: {sorted(pending)[:5]}"
    return [jobs[job_id] for job_id in job_ids]
