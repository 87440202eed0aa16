"""What `promptq up` shows in its terminal once everything runs: promptq's own short lines
(jobs finishing, errors from any part, a part that stopped), while each part's whole log
goes to its file in .promptq/logs/.

Finished jobs come from the word workers already publish when a job ends (Redis pub/sub,
promptq.jobs.announcements), read back from the database, which has the truth. Errors come
from the parts' own logs, followed as files: a line at ERROR or above is shown, in short,
with where to read the rest.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import redis

from promptq.db import session_scope
from promptq.jobs.announcements import CHANNEL
from promptq.jobs.repository import JobRepository
from promptq.jobspec.presenter import job_to_api
from promptq.redis_roles import redis_client

# A burst (a batch, `promptq run`) would scroll the terminal away: past a few lines per
# interval, the rest of it is one summary line.
LINES_PER_INTERVAL = 5
INTERVAL_SECONDS = 2.0
FOLLOW_SECONDS = 0.5
MAX_LINE = 160
# The text log format of promptq's processes and Celery's: "date time LEVEL logger: text".
_LEVEL = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (ERROR|CRITICAL) ([\w.]+): (.*)$")

Say = Callable[[str], None]


def say(text: str) -> None:
    click.echo(f"{datetime.now():%H:%M:%S} {text}")


def short(text: str, limit: int = MAX_LINE) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class FinishedJobs(threading.Thread):
    """Prints a line per finished job (a summary line for the rest of a burst)."""

    def __init__(self, redis_url: str, database_url: str, out: Say = say) -> None:
        super().__init__(name="promptq-up-jobs", daemon=True)
        self._redis_url = redis_url
        self._database_url = database_url
        self._out = out
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._follow()
            except redis.RedisError:
                # Redis restarting; what finished meanwhile is in the database and /v1/jobs.
                self._stopping.wait(1.0)

    def _follow(self) -> None:
        client = redis_client(self._redis_url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(CHANNEL)
        try:
            while not self._stopping.is_set():
                ids: list[str] = []
                deadline = time.monotonic() + INTERVAL_SECONDS
                while (left := deadline - time.monotonic()) > 0 and not self._stopping.is_set():
                    message = pubsub.get_message(timeout=min(left, 0.5))
                    if message is not None and isinstance(message.get("data"), bytes):
                        ids.append(message["data"].decode())
                if ids:
                    self._show(ids)
        finally:
            pubsub.close()
            client.close()

    def _show(self, ids: list[str]) -> None:
        with session_scope(self._database_url) as session:
            jobs = [job_to_api(job) for job in JobRepository(session).many(ids)]
        jobs.sort(key=lambda job: str(job["finished_at"]))
        for job in jobs[:LINES_PER_INTERVAL]:
            self._out(describe_job(job))
        rest = jobs[LINES_PER_INTERVAL:]
        if rest:
            succeeded = sum(job["status"] == "succeeded" for job in rest)
            self._out(
                f"… and {len(rest)} more jobs finished ({succeeded} succeeded, "
                f"{len(rest) - succeeded} not); `promptq jobs ls` lists them"
            )


def describe_job(job: dict[str, Any]) -> str:
    took = ""  # a job canceled before it started never ran
    if job.get("started_at") and job.get("finished_at"):
        started = datetime.fromisoformat(job["started_at"].replace("Z", "+00:00"))
        finished = datetime.fromisoformat(job["finished_at"].replace("Z", "+00:00"))
        took = f"  {(finished - started).total_seconds():.1f} s"
    head = f"{job['id']}  {job['status']:9}  {job['model']}{took}"
    if job["status"] == "succeeded":
        return f"{head}  ${(job.get('cost') or {}).get('total', '?')}"
    error = job.get("error") or {}
    upstream = f"upstream {error['upstream_status']}: " if error.get("upstream_status") else ""
    text = f"{upstream}{error.get('message') or error.get('type') or ''}"
    return f"{head}  {short(text, MAX_LINE - len(head))}"


class LogErrors(threading.Thread):
    """Follows the parts' log files and prints their ERROR and CRITICAL lines, in short."""

    def __init__(self, files: dict[str, Path], out: Say = say) -> None:
        super().__init__(name="promptq-up-logs", daemon=True)
        self._files = files
        self._out = out
        self._stopping = threading.Event()
        # From the end of what is there: an earlier run's errors are not news.
        self._offsets = {name: _size(path) for name, path in files.items()}

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.wait(FOLLOW_SECONDS):
            for name, path in self._files.items():
                for line in self._new_lines(name, path):
                    found = _LEVEL.match(line)
                    if found:
                        level, logger, text = found.groups()
                        self._out(short(f"{name}: {level} {logger}: {text} (more in {path})"))

    def _new_lines(self, name: str, path: Path) -> list[str]:
        try:
            with open(path, "rb") as log:
                log.seek(self._offsets[name])
                data = log.read()
        except OSError:
            return []
        # Only whole lines; a line being written is read next time.
        complete = data[: data.rfind(b"\n") + 1]
        self._offsets[name] += len(complete)
        return complete.decode("utf-8", "replace").splitlines()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def last_lines(path: Path, count: int = 15) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(max(0, _size(path) - 16_384))
            return "\n".join(log.read().decode("utf-8", "replace").splitlines()[-count:])
    except OSError:
        return ""
