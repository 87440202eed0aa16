"""What a worker process sets up and tears down around its life: its garbage collector's
thresholds (worker.gc_policy); its database pool's first connections, opened before it
takes a job; the threads that live as long as it does, the rate-limit dispatcher and the
webhook delivery pool with its loop, which finishes the deliveries it is sending before the
process exits; and, when it begins to stop, no more upstream calls started."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_init, worker_ready, worker_shutdown, worker_shutting_down

from promptq.db import open_pool
from worker.dispatcher import Dispatcher
from worker.gc_policy import collect_less_often

log = logging.getLogger(__name__)

_dispatcher: Dispatcher | None = None


@worker_init.connect
def _tune(**_: Any) -> None:
    # Before the worker consumes anything, in `promptq worker` and `celery worker` alike.
    collect_less_often()


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    global _dispatcher
    from worker.app import get_app
    from worker.context import worker_context

    _dispatcher = Dispatcher(get_app(), worker_context().limiter)
    _dispatcher.start()
    worker_context().deliveries.start()
    _open_database_pool()


def _open_database_pool() -> None:
    # Before Celery logs the worker ready (once this signal's handlers return): the pool's
    # size without its overflow, which a burst opens as it needs it.
    from worker.context import worker_context

    settings = worker_context().settings
    try:
        open_pool(settings, settings.database_pool_size)
    except Exception:
        # The database away at the start: the connections open as the first jobs want them,
        # and those jobs wait for the database as any job does.
        log.warning("could not open the database pool's connections ahead", exc_info=True)


@worker_shutting_down.connect
def _start_no_more_calls(**_: Any) -> None:
    # The calls in flight finish (a warm shutdown waits for them); the standby jobs put their
    # messages back rather than start calls the shutdown would wait for too.
    from worker.context import worker_context

    worker_context().runner.call_slots.close()


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    if _dispatcher is not None:
        _dispatcher.stop()
    from worker.context import worker_context

    worker_context().leases.stop()
    worker_context().deliveries.shutdown()
