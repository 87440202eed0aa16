"""The worker's Celery app is built when first asked for, not when its tasks are imported:
a tool or test that imports them needs no broker settings, and `celery -A worker.app` still
finds the app. And a worker process Celery builds collects garbage on its own thresholds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # A fresh process (this one has built apps already), in a directory with no .env.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_importing_the_tasks_needs_no_broker_settings(tmp_path: Path) -> None:
    done = _python(
        "import worker.tasks\n"
        "from worker.tasks.jobs import run_job\n"
        "import worker.app\n"
        "assert worker.app.get_app.cache_info().currsize == 0, 'the app was built'\n",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr


def test_the_app_asked_for_holds_every_task(tmp_path: Path) -> None:
    done = _python(
        "from promptq.broker import task_names\n"
        "import worker.tasks\n"
        "from celery.app.utils import find_app\n"
        "app = find_app('worker.app')\n"
        "import worker.app\n"
        "assert app is worker.app.get_app()\n"
        "names = [task_names.RUN_JOB, task_names.DELIVER_WEBHOOK, task_names.FEED_BATCH,\n"
        "         task_names.SWEEP, task_names.PRUNE]\n"
        "missing = [name for name in names if name not in app.tasks]\n"
        "assert not missing, missing\n",
        tmp_path,
        PROMPTQ_REDIS_URL="redis://127.0.0.1:1/0",
    )
    assert done.returncode == 0, done.stderr


def test_a_worker_collects_garbage_less_often(tmp_path: Path) -> None:
    # Celery's own worker builds the process (worker_init), as `promptq worker` and
    # `celery -A worker.app worker` do; importing the tasks alone changes nothing.
    done = _python(
        "import gc\n"
        "import worker.tasks\n"
        "from worker.app import get_app\n"
        "from worker.gc_policy import WORKER_GC_THRESHOLDS\n"
        "assert gc.get_threshold() != WORKER_GC_THRESHOLDS, gc.get_threshold()\n"
        "get_app().WorkController(pool_cls='solo', concurrency=1)\n"
        "assert gc.get_threshold() == WORKER_GC_THRESHOLDS, gc.get_threshold()\n",
        tmp_path,
        PROMPTQ_REDIS_URL="redis://127.0.0.1:1/0",
    )
    assert done.returncode == 0, done.stderr
