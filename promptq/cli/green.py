"""`promptq worker` runs on gevent: patched before anything else is imported.

The worker waits on slow upstream calls in greenlets (promptq.broker.celery_app says why).
gevent makes blocking code cooperative by swapping the standard library's sockets, locks,
threads and sleeps for its own, which holds only if it happens before any other module has
taken a reference to the originals: so here, first thing in the command line's package, and
only for the command that needs it (the API, beat, `promptq up` itself stay unpatched).
Celery's own command line does the same for `celery worker -P gevent`
(celery.maybe_patch_concurrency).
"""

from __future__ import annotations

GREEN_COMMANDS = frozenset({"worker"})


def command_of(argv: list[str]) -> str | None:
    """The subcommand `argv` runs: its first argument that is not an option."""
    return next((argument for argument in argv[1:] if not argument.startswith("-")), None)


def patch_if_green(argv: list[str]) -> bool:
    if command_of(argv) not in GREEN_COMMANDS:
        return False
    from gevent import monkey

    monkey.patch_all()
    return True
