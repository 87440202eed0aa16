"""What a worker process is set up with before Celery runs: gevent's patching for the
`worker` command only, and Celery's per-task lines kept out of the logs."""

from __future__ import annotations

import logging

import pytest

from promptq.cli.green import command_of, patch_if_green
from promptq.config import Settings
from promptq.logging import TRACE_LOGGER, TaskSuccessFilter, logging_config


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["promptq", "worker", "--concurrency=10"], "worker"),
        (["/venv/bin/promptq", "--help"], None),
        (["promptq", "api", "--port=8000"], "api"),
        (["python -m promptq", "--verbose", "up"], "up"),
        (["promptq"], None),
    ],
)
def test_the_command_is_the_first_argument_that_is_not_an_option(
    argv: list[str], command: str | None
) -> None:
    assert command_of(argv) == command


@pytest.mark.parametrize("command", ["api", "up", "beat", "flower", "db"])
def test_only_the_worker_is_patched(command: str) -> None:
    # Patching this test process would turn every later test's sockets into gevent's.
    assert patch_if_green(["promptq", command]) is False


def record(msg: str) -> logging.LogRecord:
    return logging.LogRecord(TRACE_LOGGER, logging.INFO, __file__, 1, msg, None, None)


def test_celery_success_lines_are_dropped_and_its_other_lines_kept() -> None:
    quiet = TaskSuccessFilter()
    success = "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s"
    assert quiet.filter(record(success)) is False
    assert quiet.filter(record("Task %(name)s[%(id)s] retry: %(exc)s")) is True
    assert quiet.filter(record("Task %(name)s[%(id)s] raised unexpected: %(exc)s")) is True


def test_per_task_lines_come_back_at_debug() -> None:
    assert logging_config(Settings(log_level="INFO"))["loggers"]
    assert logging_config(Settings(log_level="DEBUG"))["loggers"] == {}
