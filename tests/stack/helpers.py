"""Small helpers the tests share. Child processes go through promptq.supervisor, as they do
for `promptq up` and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
import redis.connection

from promptq import supervisor
from promptq.supervisor import Child

REPO = Path(__file__).resolve().parents[2]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def unique(text: str) -> str:
    """A prompt no other test sends: the simulator counts calls and keys faults by prompt."""
    return f"{uuid.uuid4().hex[:8]} {text}"


def wait_for_status(
    client: Any, key: str, job_id: str, statuses: set[str], timeout: float = 20
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()
        if job.get("status") in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {statuses}; last seen: {job}")


def clean_env(**extra: str) -> dict[str, str]:
    """This machine's environment without any promptq setting, plus `extra`."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_") and k != "COMETAPI_KEY"
    }
    return {**env, **extra}


def run_promptq(
    *args: str,
    env: dict[str, str],
    cwd: Path | None = None,
    check: bool = True,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """`promptq ARGS` run to its end with exactly `env`, its output captured; with `check`,
    it must have succeeded."""
    result = subprocess.run(
        [sys.executable, "-m", "promptq", *args],
        env=env,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def start_worker(
    env: dict[str, str], log_path: Path, concurrency: int = 16, timeout: float = 30
) -> Child:
    """A real `promptq worker` process with `env`, once it says it is ready."""
    args = ["worker", f"--concurrency={concurrency}", f"--hostname=test-{uuid.uuid4().hex[:6]}@%h"]
    worker = supervisor.start("worker", args, {**os.environ, **env}, log_path, cwd=REPO)
    try:
        supervisor.wait_until(lambda: worker.logged(b"ready."), [worker], timeout, "the worker")
    except (supervisor.ChildExited, supervisor.NotReady):
        worker.kill()
        raise RuntimeError(f"worker did not start:\n{worker.log_text()}") from None
    return worker


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a worker's warm shutdown), SIGKILL if it takes over 20 s."""
    supervisor.stop([process], timeout=20)


def start_process(args: list[str], env: dict[str, str], log_path: Path) -> Child:
    """`promptq ARGS` as a real child process, its output in `log_path`."""
    return supervisor.start(args[0], args, {**os.environ, **env}, log_path, cwd=REPO, append=True)


@contextlib.contextmanager
def running_api(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """A real `promptq api` process on a free port, its URL once it answers."""
    port = supervisor.free_port()
    process = start_process(["api", f"--port={port}"], env, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url, process)
        yield url
    finally:
        supervisor.stop([process], timeout=20)


def wait_for_http(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    try:
        supervisor.wait_until(
            lambda: supervisor.answers(f"{url}/healthz", timeout=1), [process], timeout, url
        )
    except supervisor.ChildExited:
        raise RuntimeError(f"the process serving {url} exited") from None
    except supervisor.NotReady:
        raise RuntimeError(f"{url} did not answer in {timeout}s") from None


# How long a slow receiver (the slow_receiver fixture) holds each POST.
SLOW_RECEIVER_SECONDS = 2.0


class Receiver:
    """Records every request; answers with the scripted statuses, then 200, after `delay`
    seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.requests: list[tuple[dict[str, str], bytes, float]] = []
        self.script: list[int] = []
        self.delay = delay
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.requests.append((headers, body, time.monotonic()))
                time.sleep(receiver.delay)
                status = receiver.script.pop(0) if receiver.script else 200
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.requests) >= count, f"{len(self.requests)} deliveries, not {count}"


def default_sigint() -> None:
    """For a child that a test stops with SIGINT, as Ctrl-C does: a test run started in the
    background of a non-interactive shell inherits SIGINT ignored, and so would the child."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def assert_named_as_redis_py(client: Any) -> None:
    """What redis-py tells the server it is (CLIENT SETINFO, Redis 7.2 and later)."""
    driver = client.connection_pool.connection_kwargs["driver_info"]
    assert (driver.formatted_name, driver.lib_version) == ("redis-py", redis.__version__)


def command_names(packed: Any) -> list[str]:
    """The command names of a packed RESP request (one, or a pipeline's several)."""
    chunks = packed if isinstance(packed, list | tuple) else [packed]
    data = b"".join(bytes(chunk) for chunk in chunks)
    names: list[str] = []
    lines = data.split(b"\r\n")
    index = 0
    while index < len(lines):
        if lines[index].startswith(b"*") and index + 2 < len(lines):
            names.append(lines[index + 2].decode(errors="replace").upper())
            count = int(lines[index][1:])
            index += 1 + 2 * count
        else:
            index += 1
    return names


def record_redis_trips(
    monkeypatch: Any, wanted: Callable[[Any], bool], into: list[list[str]]
) -> Callable[[], None]:
    """Append to `into` each Redis round trip of this process that `wanted` (given the
    packed request) keeps, as the commands it carried (command_names). A counting wrapper
    around redis-py's connection send: the real server still gets every command. Returns
    what stops the recording."""
    send = redis.connection.AbstractConnection.send_packed_command

    def counting_send(self: Any, command: Any, check_health: bool = True) -> None:
        if wanted(command):
            into.append(command_names(command))
        send(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting_send)
    return lambda: monkeypatch.setattr(
        redis.connection.AbstractConnection, "send_packed_command", send
    )


def key_id_of(database_url: str, plain: str) -> str:
    """The id of the client key `plain`."""
    from promptq.db import session_scope
    from promptq.keys.service import authenticate

    with session_scope(database_url) as session:
        record = authenticate(session, plain)
        assert record is not None
        return record.id
