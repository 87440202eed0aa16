"""promptq.supervisor, which `promptq up`, these tests and the benchmarks start and stop
their processes with: what it says when a child dies early, and that a child deaf to
SIGTERM is killed at the deadline."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from promptq import supervisor


def test_a_child_that_exits_while_waited_for_is_named_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "wrong.log"
    log.write_text("an earlier run\n")
    child = supervisor.start(
        "wrong", ["no-such-command"], {}, log, append=True, banner="promptq no-such-command"
    )

    with pytest.raises(supervisor.ChildExited) as exited:
        supervisor.wait_until(lambda: False, [child], timeout=30, what="never")

    assert exited.value.name == "wrong" and exited.value.returncode == 2
    assert exited.value.log_path == log
    message = str(exited.value)
    assert message.startswith("wrong exited with code 2; its log ends with:")
    assert "No such command 'no-such-command'" in message
    # Appended after a banner: the earlier run's lines are still there.
    assert log.read_text().startswith("an earlier run\n\n==== promptq no-such-command ====\n")


def test_waiting_gives_up_at_the_timeout(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = time.monotonic()
        with pytest.raises(supervisor.NotReady, match="the sleeper not ready in 1s"):
            supervisor.wait_until(lambda: False, [sleeper], timeout=1, what="the sleeper")
        assert time.monotonic() - started < 5
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_child_deaf_to_sigterm_is_killed_at_the_deadline() -> None:
    deaf = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert deaf.stdout is not None and deaf.stdout.readline() == b"ready\n"
    said: list[str] = []

    started = time.monotonic()
    supervisor.stop([deaf, polite], timeout=2, say=said.append)

    assert 1.9 < time.monotonic() - started < 10
    assert polite.returncode == -15  # SIGTERM, at once
    assert deaf.returncode == -9  # SIGKILL, at the deadline
    assert said == [
        f"stopping process {deaf.pid} (pid {deaf.pid})",
        f"stopping process {polite.pid} (pid {polite.pid})",
        f"process {deaf.pid} did not stop in 2s; killing it",
    ]
