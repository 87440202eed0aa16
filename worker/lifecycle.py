"""What a worker process sets up and tears down around its life: its garbage collector's
thresholds (worker.gc_policy); the threads that live as long as it does, the rate-limit
dispatcher and the webhook delivery pool with its loop, which finishes the deliveries it
is sending before the process exits; and, when it begins to stop, no more upstream calls
started."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_init, worker_ready, worker_shutdown, worker_shutting_down

from worker.dispatcher import Dispatcher
from worker.gc_policy import collect_less_often

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
