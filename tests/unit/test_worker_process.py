"""What a worker process is set up with before Celery runs: gevent's patching for the
`worker` command only, Celery's per-task lines kept out of the logs, and its record of a
message handed back to the queue made an INFO line."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from celery.app import trace
from celery.app.task import Context
from celery.exceptions import Reject

from promptq.cli.green import command_of, patch_if_green
from promptq.config import Settings
from promptq.logging import (
    PER_TASK_LOGGER,
    TRACE_LOGGER,
    HandedBackFilter,
    TaskSuccessFilter,
    logging_config,
)


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
    assert PER_TASK_LOGGER in logging_config(Settings(log_level="INFO"))["loggers"]
    assert PER_TASK_LOGGER not in logging_config(Settings(log_level="DEBUG"))["loggers"]


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def trace_records() -> Iterator[Kept]:
    """What Celery's tracer logs, through the filter as the logging config attaches it."""
    logger = logging.getLogger(TRACE_LOGGER)
    kept, handed_back = Kept(), HandedBackFilter()
    level, propagate = logger.level, logger.propagate
    logger.addFilter(handed_back)
    logger.addHandler(kept)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield kept
    finally:
        logger.removeFilter(handed_back)
        logger.removeHandler(kept)
        logger.setLevel(level)
        logger.propagate = propagate


def celery_logs_a_reject(requeue: bool) -> None:
    """As Celery's tracer does when a task raises Reject (celery.app.trace.build_tracer)."""
    task = SimpleNamespace(name="promptq.run_job")
    request = Context(id="task-1", args=["job_1"], kwargs={}, hostname="w@host")
    try:
        raise Reject("the worker is stopping", requeue=requeue)
    except Reject as error:
        trace.TraceInfo(trace.REJECTED, error).handle_reject(task, request)


def test_a_message_handed_back_is_one_info_line_without_a_traceback(trace_records: Kept) -> None:
    celery_logs_a_reject(requeue=True)
    [record] = trace_records.records
    assert record.levelno == logging.INFO
    assert record.exc_info is None and record.exc_text is None
    assert "traceback" not in record.__dict__["data"]
    assert "the worker is stopping" in record.getMessage()


def test_a_message_rejected_for_good_stays_a_warning_with_its_traceback(
    trace_records: Kept,
) -> None:
    celery_logs_a_reject(requeue=False)
    [record] = trace_records.records
    assert record.levelno == logging.WARNING
    assert record.exc_info is not None
    assert "Traceback" in record.__dict__["data"]["traceback"]


def test_a_message_handed_back_is_not_shown_below_info(trace_records: Kept) -> None:
    logging.getLogger(TRACE_LOGGER).setLevel(logging.WARNING)
    celery_logs_a_reject(requeue=True)
    assert trace_records.records == []
