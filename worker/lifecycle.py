"""Threads that live as long as a worker process: the rate-limit dispatcher, and the
webhook delivery pool with its loop, which finishes the deliveries it is sending before the
process exits."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_ready, worker_shutdown

from worker.dispatcher import Dispatcher

_dispatcher: Dispatcher | None = None


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    global _dispatcher
    from worker.app import get_app
    from worker.context import worker_context

    _dispatcher = Dispatcher(get_app(), worker_context().limiter)
    _dispatcher.start()
    worker_context().deliveries.start()


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    if _dispatcher is not None:
        _dispatcher.stop()
    from worker.context import worker_context

    worker_context().leases.stop()
    worker_context().deliveries.shutdown()
