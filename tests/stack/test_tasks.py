"""The house task decorator (worker.tasks.base.promptq_task) and the one module of task
names: each task is registered under its name, publishers and the beat schedule use the
same names, outages are retried, and whatever a task logs names the task and its job."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from promptq.logging import ContextFilter

PROBE = "promptq.test_probe_"


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def collected() -> Iterator[tuple[logging.Logger, Collect]]:
    handler = Collect()
    logger = logging.getLogger("promptq.test.tasks")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


def test_a_task_logs_with_its_name_and_the_ids_it_was_given(
    test_env: dict[str, str], collected: tuple[logging.Logger, Collect]
) -> None:
    from worker.tasks.base import promptq_task

    logger, handler = collected
    # A name of its own each time: Celery keeps the first task registered under a name.
    name = f"{PROBE}{uuid.uuid4().hex[:8]}"

    @promptq_task(name)
    def probe(job_id: str, delivery_id: str | None = None, note: str = "") -> str:
        logger.info("inside %s", note)
        return job_id

    assert probe("job_1", note="positional") == "job_1"
    assert probe(job_id="job_2", delivery_id="del_2") == "job_2"
    logger.info("outside")
    first, second, outside = handler.records
    assert (first.task, first.job_id) == (name, "job_1")
    assert not hasattr(first, "delivery_id")
    assert (second.job_id, second.delivery_id) == ("job_2", "del_2")
    assert not hasattr(outside, "task") and not hasattr(outside, "job_id")


def test_task_names_are_written_once(test_env: dict[str, str]) -> None:
    import worker.tasks  # noqa: F401  (registers every task)
    from promptq.broker import task_names
    from worker.app import app

    names = {value for name, value in vars(task_names).items() if name.isupper() and "." in value}
    registered = {
        name for name in app.tasks if name.startswith("promptq.") and not name.startswith(PROBE)
    }
    assert names == registered
    assert {entry["task"] for entry in app.conf.beat_schedule.values()} <= names


def test_outages_are_retried_except_by_periodic_tasks(test_env: dict[str, str]) -> None:
    from promptq.broker import task_names
    from worker.app import app
    from worker.tasks.base import TRANSIENT_ERRORS

    periodic = {entry["task"] for entry in app.conf.beat_schedule.values()}
    for name in (task_names.RUN_JOB, task_names.FEED_BATCH, task_names.DELIVER_WEBHOOK):
        task: Any = app.tasks[name]
        assert task.autoretry_for == TRANSIENT_ERRORS and task.max_retries == 20, name
        assert task.acks_late and task.ignore_result, name
    for name in periodic:
        assert not getattr(app.tasks[name], "autoretry_for", ()), name
